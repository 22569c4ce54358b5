"""`publish`: upload a version's artifacts and reports, then its manifest.json last (atomic, idempotent)."""

from __future__ import annotations

import argparse
import logging

from export_lib.commands._common import add_model_arguments, load_model
from export_lib.results import BadInputError, ValidationFailedError, read_json
from export_lib.storage.s3 import make_client
from export_lib.storage.store import (
    Store,
    build_manifest,
    collect_files,
    get_manifest,
    manifest_exists,
    publish,
    version_id,
)
from export_lib.workdir import report_path, result_path

log = logging.getLogger(__name__)
HELP = "publish the version in --workdir to the export bucket (files first, manifest.json last)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)


def _sync_result(args: argparse.Namespace, config_digest: str) -> dict:
    path = result_path(args.workdir, "sync")
    if not path.is_file():
        raise BadInputError(f"{path} is missing: publish needs the digests recorded by `sync`; run sync first "
                            "and pass the workdir it printed")
    sync = read_json(path)
    if sync.get("config_digest") != config_digest:
        raise BadInputError(f"{args.workdir} was synced with a different model spec or --variants (config digest "
                            f"{str(sync.get('config_digest'))[:12]}... vs {config_digest[:12]}...): rerun sync with "
                            "the same config and --variants as the other steps")
    if version_id(sync["checkpoint_digest"], config_digest) != sync["version"]:
        raise BadInputError(f"{path}: its version does not match its digests; the file was edited, rerun sync")
    return sync


def _require_passed_validation(workdir, selected: str) -> None:
    """Never publish what validation failed, even when a stale selection.json is left from an earlier run."""
    path = report_path(workdir, "validation")
    if not path.is_file():
        raise BadInputError(f"{path} is missing: run `validate` (then benchmark, select) before publish")
    report = read_json(path)
    entry = (report.get("variants") or {}).get(selected)
    failed = report.get("passed") is not True or (isinstance(entry, dict) and entry.get("passed") is False)
    if failed:
        raise ValidationFailedError(
            f"{path} says validation failed ({'; '.join(report.get('failures') or []) or selected + ' did not pass'})"
            f": a version that failed validation is never published. Fix the cause, then rerun validate, benchmark "
            "and select", details={"report": str(path)})


def run(args: argparse.Namespace) -> dict:
    config, spec = load_model(args)
    sync = _sync_result(args, spec.digest())
    version, store, client = sync["version"], Store.from_config(config), make_client()
    base = {"workdir": str(args.workdir), "model": spec.name, "version": version,
            "manifest_uri": store.uri(store.key(spec.name, version, "manifest.json"))}
    if manifest_exists(client, store, spec.name, version):
        log.info("version %s of %s is already published at %s: nothing to do", version, spec.name,
                 base["manifest_uri"])
        selected = get_manifest(client, store, spec.name, version).get("selected_variant")
        return {**base, "selected_variant": selected, "uploaded_bytes": 0, "already_published": True}

    variants, reports = collect_files(args.workdir, spec.variants)
    selection_file = report_path(args.workdir, "selection")
    selected = read_json(selection_file).get("selected") if selection_file.is_file() else None
    if selected is None:
        raise BadInputError(f"{selection_file} is missing or names no `selected` variant: run `select` before publish")
    if selected not in variants:
        raise BadInputError(f"the selected variant '{selected}' has no files under {args.workdir / selected}; "
                            f"built variants: {sorted(variants)}. Rerun convert/calibrate for it")
    _require_passed_validation(args.workdir, selected)
    manifest = build_manifest(model=spec.name, version=version, sync=sync, spec_json=spec.model_dump(mode="json"),
                              workdir=args.workdir, variants=variants, reports=reports)
    files = [*(f for fs in variants.values() for f in fs), *reports]
    result = publish(client, store, spec.name, version, files, manifest)
    return {**base, **result, "selected_variant": selected}
