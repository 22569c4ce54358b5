"""Arguments and loading shared by the per-model commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from export_lib.config import VARIANTS, ConfigError, ExportConfig, ModelSpec, load_config


def add_model_arguments(parser: argparse.ArgumentParser, *, workdir: bool = True) -> None:
    parser.add_argument("--model", required=True, help="model name from the export config")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of the model's variants to build (of {', '.join(VARIANTS)})")
    if workdir:
        parser.add_argument("--workdir", required=True, type=Path,
                            help="the version's work directory (<workspace>/<model>/<version>)")


def load_model(args: argparse.Namespace) -> tuple[ExportConfig, ModelSpec]:
    """The config and the model's spec, with `--variants` applied (a different variant set is a different version)."""
    if not args.config:
        raise ConfigError("no export config given: pass --config PATH or set EXPORT_CONFIG")
    config = load_config(args.config)
    spec = with_variants(config.model(args.model), args.variants)
    check_synced_spec(getattr(args, "workdir", None), spec)
    return config, spec


def check_synced_spec(workdir: Path | None, spec: ModelSpec) -> None:
    """A work directory `sync` made for one spec (config + --variants) is that version's: a step run on it with
    another spec would mix artifacts and reports of two versions (e.g. validate only onnx-fp32 in a workdir whose
    version also ships onnx-int8). Work directories without results/sync.json (hand-made) are not checked."""
    if workdir is None:
        return
    sync = Path(workdir) / "results" / "sync.json"
    try:
        synced = json.loads(sync.read_text()).get("config_digest")
    except (OSError, ValueError, AttributeError):
        return
    if synced and synced != spec.digest():
        raise ConfigError(
            f"{workdir} was synced with a different model spec or --variants (config digest {synced[:12]}... vs "
            f"{spec.digest()[:12]}...): pass the same config and --variants as sync did, or rerun sync and use the "
            "workdir it prints")


def with_variants(spec: ModelSpec, variants: str | list[str] | None) -> ModelSpec:
    if not variants:
        return spec
    wanted = [v.strip() for v in variants.split(",")] if isinstance(variants, str) else list(variants)
    unknown = [v for v in wanted if v not in spec.variants]
    if unknown:
        raise ConfigError(
            f"variants {unknown} are not configured for model '{spec.name}' (configured: {spec.variants}); "
            "add them to the model's `variants:` in the export config first"
        )
    if "onnx-fp32" not in wanted:
        wanted.insert(0, "onnx-fp32")  # every other variant is built from it
    data = spec.model_dump()
    data["variants"] = [v for v in spec.variants if v in wanted]
    return ModelSpec.model_validate(data)
