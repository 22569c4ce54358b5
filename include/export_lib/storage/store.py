"""The versioned, atomic artifact store: `s3://<export_bucket>/<export_prefix>/<model>/<version>/...`.

- version id = sha256(checkpoint_digest + config_digest)[:16]: the same checkpoint and spec always map to the
  same version, so an existing version is the nightly cache.
- checkpoint digest = sha256 of the sorted `sha256sum`-style lines "<sha256>  <name>\\n" of the checkpoint files.
- publish uploads every file first and `manifest.json` last with `If-None-Match: *`. A version without a
  manifest does not exist for anyone (listing, aliases, GC); a half-published one is completed by the next publish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from export_lib.results import BadInputError, read_json
from export_lib.storage.s3 import (
    error_code,
    get_bytes,
    head,
    is_conditional_unsupported,
    is_precondition_failed,
    iter_objects,
    join_key,
    storage_error,
)
from export_lib.storage.sync import DEFAULT_TRANSFER, Progress, TransferSettings, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RESERVED = ("_aliases", "_audit")  # per-model folders that are not versions
REPORTS = ("validation", "gx_result", "benchmark", "selection")


# ------------------------------------------------------------------------------------------------ identity
def checkpoint_digest(files: Iterable[tuple[str, str]]) -> str:
    """sha256 over the sorted (relative name, sha256) list, as `sha256sum` lines (reproducible with coreutils)."""
    lines = "".join(f"{sha}  {name}\n" for name, sha in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def version_id(ckpt_digest: str, config_digest: str) -> str:
    return hashlib.sha256((ckpt_digest + config_digest).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Store:
    bucket: str
    prefix: str

    @classmethod
    def from_config(cls, config: Any) -> Store:
        return cls(config.pipeline.export_bucket, config.pipeline.export_prefix.strip("/"))

    def model_prefix(self, model: str) -> str:
        return join_key(self.prefix, model) + "/"

    def version_prefix(self, model: str, version: str) -> str:
        return join_key(self.prefix, model, version) + "/"

    def key(self, model: str, version: str, name: str) -> str:
        return join_key(self.prefix, model, version, name)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


# --------------------------------------------------------------------------------------------------- reads
def manifest_exists(client: Any, store: Store, model: str, version: str) -> bool:
    return head(client, store.bucket, store.key(model, version, MANIFEST)) is not None


def list_versions(client: Any, store: Store, model: str) -> list[dict[str, Any]]:
    """Published (manifested) versions, newest first: {version, published_at, manifest_uri}."""
    base = store.model_prefix(model)
    out = []
    for o in iter_objects(client, store.bucket, base):
        version, _, rest = o.key[len(base):].partition("/")
        if rest == MANIFEST and version not in RESERVED:
            out.append({"version": version, "published_at": o.last_modified.astimezone(UTC).isoformat(),
                        "manifest_uri": store.uri(o.key)})
    return sorted(out, key=lambda v: (v["published_at"], v["version"]), reverse=True)


def list_incomplete(client: Any, store: Store, model: str) -> list[dict[str, Any]]:
    """Version folders with objects but no manifest (a killed publish): {version, objects, last_modified}."""
    base = store.model_prefix(model)
    seen: dict[str, dict[str, Any]] = {}
    manifested = set()
    for o in iter_objects(client, store.bucket, base):
        version, _, rest = o.key[len(base):].partition("/")
        if not rest or version in RESERVED:
            continue
        if rest == MANIFEST:
            manifested.add(version)
        entry = seen.setdefault(version, {"version": version, "objects": 0, "last_modified": o.last_modified})
        entry["objects"] += 1
        entry["last_modified"] = max(entry["last_modified"], o.last_modified)
    return [v for k, v in sorted(seen.items()) if k not in manifested]


def get_manifest(client: Any, store: Store, model: str, version: str) -> dict[str, Any]:
    got = get_bytes(client, store.bucket, store.key(model, version, MANIFEST))
    if got is None:
        known = [v["version"] for v in list_versions(client, store, model)][:10]
        raise BadInputError(f"model '{model}' has no published version '{version}' (no manifest at "
                            f"{store.uri(store.key(model, version, MANIFEST))}); published versions, newest first: "
                            f"{known or 'none'}", details={"model": model, "version": version})
    return json.loads(got[0])


# ----------------------------------------------------------------------------------------- conditional put
def put_if_absent(client: Any, bucket: str, key: str, body: bytes, content_type: str = "application/json") -> bool:
    """Create `key` only if it does not exist (If-None-Match: *). True if this call created it.

    Stores without conditional writes answer NotImplemented/InvalidArgument: then head-then-put, which is
    only safe because every writer of a given key here writes equivalent content (said in the log)."""
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, IfNoneMatch="*")
        return True
    except Exception as e:
        if is_precondition_failed(e):
            return False
        if not is_conditional_unsupported(e):
            if error_code(e):
                raise storage_error(e, "writing", bucket, key) from e
            raise
        log.warning("the store rejected a conditional write (%s) for s3://%s/%s: falling back to head-then-put, "
                    "which is not atomic against a concurrent writer", error_code(e), bucket, key)
    if head(client, bucket, key) is not None:
        return False
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
    except Exception as e:
        if error_code(e):
            raise storage_error(e, "writing", bucket, key) from e
        raise
    return True


# ------------------------------------------------------------------------------------------ the work dir
@dataclass(frozen=True)
class LocalFile:
    name: str  # key relative to the version prefix
    path: Path
    size: int
    sha256: str


def _files_under(root: Path, base: Path) -> list[LocalFile]:
    return [LocalFile(p.relative_to(base).as_posix(), p, p.stat().st_size, sha256_file(p))
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]


def collect_files(workdir: Path, variants: Iterable[str]) -> tuple[dict[str, list[LocalFile]], list[LocalFile]]:
    """({variant: its files} for the variants that were built, the report files)."""
    built = {v: _files_under(workdir / v, workdir) for v in variants if (workdir / v).is_dir()}
    reports = [f for f in _files_under(workdir / "reports", workdir) if f.name.endswith(".json")] \
        if (workdir / "reports").is_dir() else []
    return {v: fs for v, fs in built.items() if fs}, reports


def _optional_json(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def library_versions(workdir: Path) -> dict[str, str]:
    """What converted the model (results/convert.json `library_versions`) plus what publishes it."""
    import boto3

    from export_lib import __version__

    convert = _optional_json(workdir / "results" / "convert.json") or {}
    return {**convert.get("library_versions", {}), "python": platform.python_version(), "boto3": boto3.__version__,
            "export_lib": __version__}


def gx_summary(report: Any) -> Any:
    if not isinstance(report, dict):
        return report
    keys = ("success", "statistics")
    return {k: report[k] for k in keys if k in report} or report


def build_manifest(*, model: str, version: str, sync: dict[str, Any], spec_json: dict[str, Any],
                   workdir: Path, variants: dict[str, list[LocalFile]], reports: list[LocalFile],
                   now: datetime | None = None) -> dict[str, Any]:
    reps = {name: _optional_json(workdir / "reports" / f"{name}.json") for name in REPORTS}
    selection = reps["selection"] or {}
    return {
        "schema": 1,
        "model": model,
        "version": version,
        "created_at": (now or datetime.now(UTC)).isoformat(),
        "checkpoint": {"uri": sync["checkpoint_uri"], "step": sync.get("checkpoint_step"),
                       "digest": sync["checkpoint_digest"], "files": sync.get("checkpoint_files", [])},
        "data": sync.get("data_files", []),
        "config": spec_json,
        "config_digest": sync["config_digest"],
        "library_versions": library_versions(workdir),
        "variants": {v: {"files": [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in fs]}
                     for v, fs in variants.items()},
        "selected_variant": selection.get("selected"),
        "selection": selection,
        "validation": reps["validation"],
        "benchmark": reps["benchmark"],
        "gx_result": gx_summary(reps["gx_result"]),
        "files": [{"name": f.name, "sha256": f.sha256, "size": f.size}
                  for f in [*(f for fs in variants.values() for f in fs), *reports]],
    }


# ----------------------------------------------------------------------------------------------- publish
def _already_there(client: Any, store: Store, key: str, f: LocalFile) -> bool:
    meta = head(client, store.bucket, key)
    return (meta is not None and int(meta["ContentLength"]) == f.size
            and meta.get("Metadata", {}).get("sha256") == f.sha256)


def upload(client: Any, store: Store, key: str, f: LocalFile, settings: TransferSettings) -> None:
    try:
        client.upload_file(str(f.path), store.bucket, key, Config=settings.boto(),
                           ExtraArgs={"Metadata": {"sha256": f.sha256}},
                           Callback=Progress(store.uri(key), f.size, settings.progress_interval_s))
    except Exception as e:
        cause = e if error_code(e) else e.__cause__
        if cause is not None and error_code(cause):
            raise storage_error(cause, "uploading", store.bucket, key) from e
        raise


def publish(client: Any, store: Store, model: str, version: str, files: list[LocalFile], manifest: dict[str, Any],
            settings: TransferSettings = DEFAULT_TRANSFER) -> dict[str, Any]:
    """Upload files (skipping those a previous, interrupted publish already stored), then the manifest last."""
    manifest_key = store.key(model, version, MANIFEST)
    result = {"version": version, "manifest_uri": store.uri(manifest_key), "uploaded_bytes": 0,
              "uploaded_files": 0, "reused_files": 0, "already_published": False}
    if head(client, store.bucket, manifest_key) is not None:
        log.info("version %s of %s is already published at %s: nothing to do", version, model, result["manifest_uri"])
        return {**result, "already_published": True}
    for f in files:
        key = store.key(model, version, f.name)
        if _already_there(client, store, key, f):
            log.info("%s already uploaded by an earlier, interrupted publish: kept", store.uri(key))
            result["reused_files"] += 1
            continue
        upload(client, store, key, f, settings)
        result["uploaded_bytes"] += f.size
        result["uploaded_files"] += 1
    body = (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode()
    if not put_if_absent(client, store.bucket, manifest_key, body):
        # Same version id = same inputs: another run published equivalent artifacts first.
        log.info("version %s of %s was published concurrently by another run: keeping theirs", version, model)
        return {**result, "already_published": True}
    log.info("published %s of %s: %d file(s), %d bytes uploaded, %d reused; manifest %s", version, model,
             result["uploaded_files"], result["uploaded_bytes"], result["reused_files"], result["manifest_uri"])
    return result
