"""Helpers for the export-engine tests: model specs, config files, checkpoints and CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def digits_spec(ckpt_dir: Path, **overrides: Any) -> dict[str, Any]:
    spec = {
        "name": "digits-cnn",
        "factory": "model_zoo.digits:DigitsCNN",
        "checkpoint": {"uri": str(ckpt_dir), "filename": "model.safetensors"},
        "inputs": [{"name": "pixels", "shape": ["batch", 1, 8, 8],
                    "dynamic": {"batch": {"min": 1, "opt": 8, "max": 32}}}],
        "outputs": ["logits"],
    }
    spec.update(overrides)
    return spec


def encoder_spec(ckpt_dir: Path, vocab: int = 50, **overrides: Any) -> dict[str, Any]:
    dynamic = {"batch": {"min": 1, "opt": 4, "max": 16}, "seq": {"min": 4, "opt": 12, "max": 32}}
    spec = {
        "name": "tiny-encoder",
        "factory": "model_zoo.encoder:TinyEncoder",
        "factory_kwargs": {"vocab": vocab, "max_len": 32},
        "checkpoint": {"uri": str(ckpt_dir), "filename": "model.pt", "format": "state_dict"},
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"], "dynamic": dynamic,
             "sample": {"kind": "randint", "low": 0, "high": vocab}},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"], "dynamic": dynamic,
             "sample": {"kind": "ones"}},
        ],
        "outputs": ["logits"],
    }
    spec.update(overrides)
    return spec


def write_config(path: Path, *models: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    path.write_text(yaml.safe_dump({"models": list(models), **(extra or {})}, sort_keys=False))
    return path


def spec_of(model: dict[str, Any]):
    from export_lib.config import ModelSpec

    return ModelSpec.model_validate(model)


def write_module(directory: Path, name: str, source: str) -> Path:
    """A newcomer's model module, outside the package (the test puts `directory` on PYTHONPATH)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def run_cli(step: str, config: Path, model: str, workdir: Path, *extra: str,
            pythonpath: list[Path] | None = None) -> tuple[int, dict[str, Any], str]:
    """`python -m export_lib <step>` as the runtimes start it; (exit code, JSON result, stderr)."""
    result_file = workdir.parent / f"{workdir.name}-{step}-result.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "include"), *(str(p) for p in pythonpath or [])])
    proc = subprocess.run(
        [sys.executable, "-m", "export_lib", step, "--config", str(config), "--model", model,
         "--workdir", str(workdir), "--result-file", str(result_file), *extra],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    return proc.returncode, result, proc.stderr
