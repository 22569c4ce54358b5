"""Checkpoint discovery: find `<checkpoint.uri>/<folder>/` checkpoints and pick the newest complete one.

Completeness rule (CheckpointSpec): with `complete_marker` set, a folder is complete when an object with that
name exists directly in it (training writes it last); with `complete_marker: null`, when its newest object is at
least `quiescence_seconds` old. Newest: the highest step number (the last run of digits in the folder name,
e.g. `step-001200` -> 1200; ties broken by time) or, with `select: time`, the most recent object LastModified.
A `checkpoint.uri` may also be a local directory (same rule, file mtimes).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from export_lib.config import CheckpointSpec
from export_lib.results import BadInputError
from export_lib.storage.s3 import iter_objects, parse_s3_uri

log = logging.getLogger(__name__)

CHECKSUM_FILE = "SHA256SUMS"  # optional, written by training: `sha256sum` output for the folder's files
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class CheckpointFile:
    name: str  # path relative to the checkpoint folder, '/'-separated
    source: str  # S3 key, or the absolute local path
    size: int
    etag: str  # S3 ETag; for local files size+mtime, enough to detect a change
    last_modified: datetime


@dataclass(frozen=True)
class Checkpoint:
    uri: str  # the folder, ending with '/'
    bucket: str | None  # None for a local directory
    name: str
    step: int | None
    files: tuple[CheckpointFile, ...]
    complete: bool
    reason: str  # why it is (in)complete, for logs and errors

    @property
    def last_modified(self) -> datetime | None:
        return max((f.last_modified for f in self.files), default=None)

    def payload(self, spec: CheckpointSpec) -> list[CheckpointFile]:
        """The checkpoint's content: every file but the completion marker and the checksum file."""
        skip = {CHECKSUM_FILE, spec.complete_marker}
        return [f for f in self.files if f.name not in skip]


def step_number(name: str) -> int | None:
    runs = _DIGITS.findall(name)
    return int(runs[-1]) if runs else None


def completeness(files: Iterable[CheckpointFile], spec: CheckpointSpec, now: datetime) -> tuple[bool, str]:
    files = list(files)
    if spec.complete_marker:
        if any(f.name == spec.complete_marker for f in files):
            return True, f"marker '{spec.complete_marker}' present"
        return False, f"marker '{spec.complete_marker}' missing"
    if not files:
        return False, "empty"
    age = (now - max(f.last_modified for f in files)).total_seconds()
    if age >= spec.quiescence_seconds:
        return True, f"unchanged for {age:.0f}s >= quiescence_seconds={spec.quiescence_seconds}"
    return False, f"last change {age:.0f}s ago < quiescence_seconds={spec.quiescence_seconds}"


def rule_text(spec: CheckpointSpec) -> str:
    if spec.complete_marker:
        return f"a folder is complete when it contains the marker object '{spec.complete_marker}'"
    return f"a folder is complete when none of its objects changed for {spec.quiescence_seconds}s"


# ------------------------------------------------------------------------------------------------ listing
def _s3_folders(client: Any, uri: str) -> dict[str, list[CheckpointFile]]:
    """folder name -> its files, from one listing of the whole prefix (one request per 1000 objects)."""
    loc = parse_s3_uri(uri if uri.endswith("/") else uri + "/")
    folders: dict[str, list[CheckpointFile]] = {}
    for o in iter_objects(client, loc.bucket, loc.key):
        rest = o.key[len(loc.key):]
        folder, sep, name = rest.partition("/")
        if sep and name and not name.endswith("/"):
            folders.setdefault(folder, []).append(CheckpointFile(name, o.key, o.size, o.etag, o.last_modified))
    return folders


def _local_files(folder: Path) -> list[CheckpointFile]:
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out.append(CheckpointFile(p.relative_to(folder).as_posix(), str(p.resolve()), st.st_size,
                                      f"{st.st_size:x}-{st.st_mtime_ns:x}",
                                      datetime.fromtimestamp(st.st_mtime, tz=UTC)))
    return out


def _local_folders(uri: str) -> dict[str, list[CheckpointFile]]:
    base = Path(uri)
    if not base.is_dir():
        raise BadInputError(f"checkpoint.uri '{uri}' is neither s3://... nor an existing local directory")
    return {p.name: _local_files(p) for p in sorted(base.iterdir()) if p.is_dir()}


def _build(base_uri: str, bucket: str | None, name: str, files: list[CheckpointFile],
           spec: CheckpointSpec, now: datetime) -> Checkpoint:
    complete, reason = completeness(files, spec, now)
    uri = base_uri.rstrip("/") + "/" + name + "/"
    return Checkpoint(uri, bucket, name, step_number(name), tuple(sorted(files, key=lambda f: f.name)),
                      complete, reason)


def list_checkpoints(client: Any, spec: CheckpointSpec, now: datetime | None = None) -> list[Checkpoint]:
    """Every checkpoint folder under `spec.uri` with its completeness, in name order."""
    now = now or datetime.now(UTC)
    if spec.uri.startswith("s3://"):
        bucket = parse_s3_uri(spec.uri).bucket
        folders = _s3_folders(client, spec.uri)
    else:
        bucket, folders = None, _local_folders(spec.uri)
    return [_build(spec.uri, bucket, n, fs, spec, now) for n, fs in sorted(folders.items())]


def select_newest(checkpoints: Iterable[Checkpoint], select: str) -> Checkpoint | None:
    complete = [c for c in checkpoints if c.complete]
    if select == "step":
        numbered = [c for c in complete if c.step is not None]
        return max(numbered, key=lambda c: (c.step, c.last_modified), default=None)
    return max(complete, key=lambda c: c.last_modified, default=None)


def discover(client: Any, spec: CheckpointSpec, now: datetime | None = None) -> Checkpoint:
    """The newest complete checkpoint, or a BadInputError naming the prefix, the rule and what was seen."""
    found = list_checkpoints(client, spec, now)
    best = select_newest(found, spec.select)
    for c in found:
        log.debug("checkpoint %s: step=%s %s (%s)", c.uri, c.step, "complete" if c.complete else "incomplete",
                  c.reason)
    log.info("%d checkpoint folder(s) under %s, %d complete", len(found), spec.uri, sum(c.complete for c in found))
    if best is None:
        seen = "; ".join(f"{c.name}: {c.reason}" for c in found[-10:]) or "no folders at all"
        extra = " (with select: step, folder names need a step number)" if spec.select == "step" else ""
        raise BadInputError(
            f"no complete checkpoint under {spec.uri}: {rule_text(spec)}{extra}. Seen: {seen}. "
            "Check that training writes <uri>/<step>/ folders and finishes them, or fix checkpoint.uri",
            details={"uri": spec.uri, "folders": [c.name for c in found]})
    log.info("selected checkpoint %s (step=%s, by %s)", best.uri, best.step, spec.select)
    return best


def checkpoint_at(client: Any, spec: CheckpointSpec, uri: str, now: datetime | None = None) -> Checkpoint:
    """One pinned checkpoint folder; the completeness rule still applies (a half-written one is never used)."""
    now = now or datetime.now(UTC)
    folder_uri = uri.rstrip("/")
    base, _, name = folder_uri.rpartition("/")
    if uri.startswith("s3://"):
        loc = parse_s3_uri(folder_uri + "/")
        files = [CheckpointFile(o.key[len(loc.key):], o.key, o.size, o.etag, o.last_modified)
                 for o in iter_objects(client, loc.bucket, loc.key) if not o.key.endswith("/")]
        bucket = loc.bucket
    else:
        if not Path(folder_uri).is_dir():
            raise BadInputError(f"--checkpoint-uri '{uri}' is not s3://... or an existing local directory")
        files, bucket = _local_files(Path(folder_uri)), None
    c = _build(base, bucket, name, files, spec, now)
    if not files:
        raise BadInputError(f"--checkpoint-uri {c.uri} holds no objects; check the step folder name")
    if not c.complete:
        raise BadInputError(f"checkpoint {c.uri} is not complete ({c.reason}): {rule_text(spec)}; wait for "
                            "training to finish it or pin another one")
    return c
