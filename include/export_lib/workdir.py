"""Where each artifact lives inside a version's work directory (see docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path

from export_lib.config import ModelSpec


def variant_dir(workdir: Path, variant: str) -> Path:
    return Path(workdir) / variant


def variant_model_path(workdir: Path, variant: str) -> Path:
    """model.onnx for onnx-* variants, model.plan (a serialized TensorRT engine) for tensorrt-* variants."""
    name = "model.plan" if variant.startswith("tensorrt-") else "model.onnx"
    return variant_dir(workdir, variant) / name


def checkpoint_dir(workdir: Path) -> Path:
    return Path(workdir) / "checkpoint"


def checkpoint_path(workdir: Path, spec: ModelSpec) -> Path:
    return checkpoint_dir(workdir) / spec.checkpoint.filename


def data_dir(workdir: Path) -> Path:
    return Path(workdir) / "data"


def data_path(workdir: Path, uri: str, config_dir: Path | None = None) -> Path:
    """Local path of a data file named in the spec: s3:// files are synced into <workdir>/data/<basename>;
    local paths are taken as they are (relative ones from the config file's directory)."""
    if uri.startswith("s3://"):
        return data_dir(workdir) / uri.rstrip("/").rsplit("/", 1)[-1]
    p = Path(uri)
    return p if p.is_absolute() or config_dir is None else Path(config_dir) / p


def reports_dir(workdir: Path) -> Path:
    return Path(workdir) / "reports"


def report_path(workdir: Path, name: str) -> Path:
    """reports/<name>.json: validation, gx_result, benchmark, selection."""
    return reports_dir(workdir) / f"{name}.json"


def result_path(workdir: Path, step: str) -> Path:
    return Path(workdir) / "results" / f"{step}.json"
