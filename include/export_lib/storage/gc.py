"""Retention: delete old versions, never one an alias points to.

Rule: a published version is kept when it is among the newest `keep` (by publish time), OR younger than
`max_age_days` (when given), OR pointed to by any alias. Everything else is deleted. Folders without a manifest
(an interrupted publish) are deleted once untouched for `incomplete_grace_hours`.
A deletion removes `manifest.json` FIRST (the version stops existing at once, so a partly deleted version never
looks published), re-checks the aliases (an alias moved there meanwhile puts the manifest back), then the files.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from export_lib.results import BadInputError, ExportError
from export_lib.storage.aliases import aliased_versions
from export_lib.storage.s3 import error_code, get_bytes, iter_objects, storage_error
from export_lib.storage.store import MANIFEST, Store, list_incomplete, list_versions, put_if_absent

log = logging.getLogger(__name__)


def plan(versions: list[dict[str, Any]], aliased: dict[str, str], *, keep: int, max_age_days: float | None,
         now: datetime) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(kept, to delete), each [{version, why}]; `versions` newest first with ISO `published_at`."""
    if keep < 0:
        raise BadInputError(f"--keep must be >= 0, got {keep}")
    by_version: dict[str, list[str]] = {}
    for alias, version in aliased.items():
        by_version.setdefault(version, []).append(alias)
    kept, delete = [], []
    for i, v in enumerate(versions):
        age = now - datetime.fromisoformat(v["published_at"])
        if v["version"] in by_version:
            why = f"alias {', '.join(sorted(by_version[v['version']]))}"
        elif i < keep:
            why = f"among the newest {keep}"
        elif max_age_days is not None and age < timedelta(days=max_age_days):
            why = f"younger than {max_age_days:g} days"
        else:
            limit = f" and older than {max_age_days:g} days" if max_age_days is not None else ""
            delete.append({"version": v["version"], "why": f"beyond the newest {keep}{limit}"})
            continue
        kept.append({"version": v["version"], "why": why})
    return kept, delete


def _delete_keys(client: Any, store: Store, keys: list[str]) -> None:
    for i in range(0, len(keys), 1000):
        batch = keys[i:i + 1000]
        try:
            r = client.delete_objects(Bucket=store.bucket, Delete={"Objects": [{"Key": k} for k in batch],
                                                                   "Quiet": True})
        except Exception as e:
            if error_code(e):
                raise storage_error(e, "deleting", store.bucket, batch[0]) from e
            raise
        if r.get("Errors"):
            err = r["Errors"][0]
            raise ExportError(f"deleting s3://{store.bucket}/{err['Key']} failed ({err.get('Code')}): "
                              f"{err.get('Message')}; {len(r['Errors'])} object(s) not deleted, rerun gc")


def delete_version(client: Any, store: Store, model: str, version: str) -> bool:
    """Delete one version, manifest first. False when an alias moved to it meanwhile (then nothing is lost)."""
    manifest_key = store.key(model, version, MANIFEST)
    saved = get_bytes(client, store.bucket, manifest_key)
    if saved is not None:
        _delete_keys(client, store, [manifest_key])
        if version in aliased_versions(client, store, model).values():
            put_if_absent(client, store.bucket, manifest_key, saved[0])
            log.warning("version %s of %s became aliased during gc: manifest restored, version kept", version, model)
            return False
    keys = [o.key for o in iter_objects(client, store.bucket, store.version_prefix(model, version))]
    _delete_keys(client, store, keys)
    log.info("deleted version %s of %s (%d object(s))", version, model, len(keys) + (saved is not None))
    return True


def collect(client: Any, store: Store, model: str, *, keep: int, max_age_days: float | None = None,
            apply: bool = False, incomplete_grace_hours: float = 24.0, now: datetime | None = None) -> dict[str, Any]:
    """Plan (and with `apply`, carry out) retention for one model."""
    now = now or datetime.now(UTC)
    aliased = aliased_versions(client, store, model)
    kept, delete = plan(list_versions(client, store, model), aliased, keep=keep, max_age_days=max_age_days, now=now)
    stale = [{"version": v["version"], "why": f"incomplete (no manifest), untouched for >{incomplete_grace_hours:g}h"}
             for v in list_incomplete(client, store, model)
             if now - v["last_modified"] >= timedelta(hours=incomplete_grace_hours)]
    deleted = []
    if apply:
        for item in [*delete, *stale]:
            if delete_version(client, store, model, item["version"]):
                deleted.append(item)
            else:
                kept.append({"version": item["version"], "why": "aliased during gc"})
    for item in delete + stale:
        log.info("%s %s: %s", "deleted" if item in deleted else "would delete", item["version"], item["why"])
    return {"model": model, "dry_run": not apply, "aliases": aliased, "kept": kept,
            "delete": delete + stale, "deleted": [d["version"] for d in deleted]}
