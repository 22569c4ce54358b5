"""`staging` / `production` aliases: small JSON pointers moved with optimistic concurrency, plus an audit log.

Pointer: `<prefix>/<model>/_aliases/<alias>.json`. A move reads the pointer and its ETag, then writes with
`If-Match: <etag>` (`If-None-Match: *` when the alias does not exist yet): if anyone moved it in between, the write
fails and the caller gets an AliasConflictError saying who moved it, to what. Every move then appends one object
`<prefix>/<model>/_audit/<UTC timestamp>-<alias>-<uuid>.json` (who, when, from, to, why): keys sort by time and
never collide, so the log needs no locking.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import uuid
from datetime import UTC, datetime
from typing import Any

from export_lib.results import BadInputError
from export_lib.storage.s3 import (
    error_code,
    get_bytes,
    is_conditional_unsupported,
    is_precondition_failed,
    iter_objects,
    join_key,
    storage_error,
)
from export_lib.storage.store import Store, list_versions, manifest_exists, put_if_absent

log = logging.getLogger(__name__)

ALIASES = ("staging", "production")


class AliasConflictError(BadInputError):
    """Someone else moved the alias between our read and our write."""


def default_actor() -> str:
    return os.environ.get("EXPORT_ACTOR") or f"{getpass.getuser()}@{socket.gethostname()}"


def alias_key(store: Store, model: str, alias: str) -> str:
    return join_key(store.prefix, model, "_aliases", f"{alias}.json")


def audit_prefix(store: Store, model: str) -> str:
    return join_key(store.prefix, model, "_audit") + "/"


def _check_alias(alias: str) -> None:
    if alias not in ALIASES:
        raise BadInputError(f"unknown alias '{alias}': use one of {list(ALIASES)}")


def resolve_alias(client: Any, store: Store, model: str, alias: str) -> dict[str, Any] | None:
    """The pointer document plus its `etag`, or None when the alias was never set."""
    _check_alias(alias)
    got = get_bytes(client, store.bucket, alias_key(store, model, alias))
    if got is None:
        return None
    return {**json.loads(got[0]), "etag": got[1]}


def aliased_versions(client: Any, store: Store, model: str) -> dict[str, str]:
    """{alias: version} for the aliases that are set."""
    return {a: doc["version"] for a in ALIASES if (doc := resolve_alias(client, store, model, a))}


def _write_pointer(client: Any, store: Store, key: str, body: bytes, etag: str | None) -> bool:
    """Conditional write of the pointer; False when the condition failed (someone moved it)."""
    cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    try:
        client.put_object(Bucket=store.bucket, Key=key, Body=body, ContentType="application/json", **cond)
        return True
    except Exception as e:
        if is_precondition_failed(e):
            return False
        if not is_conditional_unsupported(e):
            if error_code(e):
                raise storage_error(e, "moving alias", store.bucket, key) from e
            raise
        code = error_code(e)
    log.warning("the store rejected a conditional write (%s) for s3://%s/%s: falling back to read-compare-put, "
                "which has a small race window", code, store.bucket, key)
    current = get_bytes(client, store.bucket, key)
    if (current[1] if current else None) != etag:
        return False
    client.put_object(Bucket=store.bucket, Key=key, Body=body, ContentType="application/json")
    return True


def _conflict(client: Any, store: Store, model: str, alias: str, frm: str | None, to: str) -> AliasConflictError:
    now = resolve_alias(client, store, model, alias) or {}
    where = (f"it now points to {now.get('version')!r} (moved by {now.get('actor')!r} at {now.get('updated_at')}, "
             f"reason: {now.get('reason')!r})" if now else "it is not set (no pointer exists)")
    return AliasConflictError(
        f"alias '{alias}' of model '{model}' does not point to {frm!r} as expected: {where}; this move "
        f"from {frm!r} to {to!r} was NOT applied. Check `alias history` and retry if it is still wanted",
        details={"alias": alias, "model": model, "current": now.get("version"), "moved_by": now.get("actor"),
                 "attempted": to, "expected_from": frm})


def set_alias(client: Any, store: Store, model: str, alias: str, version: str, *, actor: str | None = None,
              reason: str = "", expected_from: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Point `alias` at a published `version`. With `expected_from`, only if it currently points there."""
    _check_alias(alias)
    if not manifest_exists(client, store, model, version):
        known = [v["version"] for v in list_versions(client, store, model)][:10]
        raise BadInputError(f"cannot point '{alias}' of '{model}' at '{version}': that version is not published "
                            f"(no manifest); published versions, newest first: {known or 'none'}")
    actor = actor or default_actor()
    current = resolve_alias(client, store, model, alias)
    frm = current["version"] if current else None
    if expected_from is not None and frm != expected_from:
        raise _conflict(client, store, model, alias, expected_from, version)
    if frm == version:
        log.info("alias %s of %s already points to %s: nothing to do", alias, model, version)
        return {"model": model, "alias": alias, "version": version, "previous": frm, "changed": False}
    at = (now or datetime.now(UTC)).isoformat()
    doc = {"model": model, "alias": alias, "version": version, "previous": frm, "actor": actor, "reason": reason,
           "updated_at": at}
    body = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    if not _write_pointer(client, store, alias_key(store, model, alias), body, current["etag"] if current else None):
        raise _conflict(client, store, model, alias, frm, version)
    entry = {"model": model, "alias": alias, "from": frm, "to": version, "actor": actor, "reason": reason, "at": at}
    stamp = datetime.fromisoformat(at).astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    audit_key = f"{audit_prefix(store, model)}{stamp}-{alias}-{uuid.uuid4().hex[:12]}.json"
    put_if_absent(client, store.bucket, audit_key, (json.dumps(entry, sort_keys=True) + "\n").encode())
    log.info("alias %s of %s moved %s -> %s by %s (%s)", alias, model, frm, version, actor, reason or "no reason")
    return {**doc, "changed": True, "audit_uri": store.uri(audit_key)}


def alias_history(client: Any, store: Store, model: str, alias: str | None = None) -> list[dict[str, Any]]:
    """Audit entries, oldest first, for one alias or all."""
    if alias is not None:
        _check_alias(alias)
    out = []
    for o in iter_objects(client, store.bucket, audit_prefix(store, model)):
        name = o.key.rsplit("/", 1)[-1]
        if alias is None or f"-{alias}-" in name:
            got = get_bytes(client, store.bucket, o.key)
            if got is not None:
                out.append(json.loads(got[0]))
    return out
