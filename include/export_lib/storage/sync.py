"""Incremental, verified download of checkpoints and data files into a local cache, then into a work directory.

Cache: `<workspace>/.cache/s3/<bucket>/<key>` plus a sidecar `<workspace>/.cache/meta/<bucket>/<key>.json`
(size, ETag, sha256, local mtime). An object whose size and ETag match the sidecar (and whose cached file is
untouched) is not transferred again: a resync of an unchanged checkpoint moves zero bytes. Every download goes to
a temporary name, is hashed (and checked against the training side's SHA256SUMS when present) and only then
renamed into place, so neither the cache nor the work directory ever holds a partial or unverified file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from export_lib.config import CheckpointSpec
from export_lib.results import BadInputError, atomic_write_bytes
from export_lib.storage.checkpoints import CHECKSUM_FILE, Checkpoint
from export_lib.storage.s3 import error_code, get_bytes, head, parse_s3_uri, storage_error

log = logging.getLogger(__name__)

MB = 1024 * 1024
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


class ChecksumMismatchError(BadInputError):
    """A downloaded object does not match the checksum the training side recorded."""


@dataclass(frozen=True)
class Source:
    """One object to sync: `bucket` None means `key` is a local file path."""

    name: str  # relative name at the destination
    bucket: str | None
    key: str
    size: int
    etag: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.bucket else self.key


@dataclass(frozen=True)
class Synced:
    name: str
    path: str  # the verified file in the cache
    size: int
    sha256: str
    downloaded: bool  # False: taken from the cache unchanged


@dataclass(frozen=True)
class TransferSettings:
    multipart_threshold: int = 16 * MB
    multipart_chunksize: int = 16 * MB
    max_concurrency: int = 8  # threads per multipart object
    max_files: int = 4  # objects transferred at once
    progress_interval_s: float = 5.0

    def boto(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize,
                              max_concurrency=self.max_concurrency, use_threads=True)


DEFAULT_TRANSFER = TransferSettings()


# ------------------------------------------------------------------------------------------ pure helpers
def sha256_file(path: Path, chunk: int = 8 * MB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def parse_sha256sums(text: str, where: str) -> dict[str, str]:
    """`sha256sum` output (`<64 hex>  <name>` or `<64 hex> *<name>`; blank and '#' lines ignored)."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _SUMS_LINE.match(line)
        if not m:
            raise BadInputError(f"{where} line {n} is not '<sha256 hex>  <file name>' (sha256sum format): {line!r}")
        out[m.group(2).removeprefix("./")] = m.group(1).lower()
    return out


class Progress:
    """Transfer callback that logs percent and bytes at most every `interval` seconds (and at 100%)."""

    def __init__(self, label: str, total: int, interval: float):
        self.label, self.total, self.interval = label, total, interval
        self.done = 0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.done < self.total and now - self._last < self.interval:
                return
            self._last = now
            pct = 100.0 * self.done / self.total if self.total else 100.0
            log.info("%s: %.0f%% (%.1f / %.1f MB)", self.label, pct, self.done / MB, self.total / MB)


# --------------------------------------------------------------------------------------------------- cache
def _inside(root: Path, *parts: str) -> Path:
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BadInputError(f"object name {'/'.join(parts)!r} escapes the cache directory; rename it")
    return path


def cache_paths(cache_root: Path, src: Source) -> tuple[Path, Path]:
    """(cached file, sidecar) for a source; local files are cached under `_local/`."""
    parts = (src.bucket, src.key) if src.bucket else ("_local", src.key.lstrip("/"))
    return _inside(cache_root / "s3", *parts), _inside(cache_root / "meta", *parts[:-1], parts[-1] + ".json")


def _cached(file: Path, sidecar: Path, src: Source) -> dict | None:
    try:
        meta = json.loads(sidecar.read_text())
        st = file.stat()
    except (OSError, ValueError):
        return None
    same_remote = meta.get("etag") == src.etag and meta.get("size") == src.size
    untouched = st.st_size == src.size and st.st_mtime_ns == meta.get("mtime_ns")
    return meta if same_remote and untouched else None


def _transfer(client: Any, src: Source, tmp: Path, settings: TransferSettings) -> None:
    progress = Progress(src.uri, src.size, settings.progress_interval_s)
    if src.bucket is None:
        shutil.copyfile(src.key, tmp)
        progress(src.size)
        return
    try:
        client.download_file(src.bucket, src.key, str(tmp), Config=settings.boto(), Callback=progress)
    except Exception as e:
        # botocore has already retried throttling/5xx; what reaches here is permanent.
        cause = e if error_code(e) else e.__cause__
        if cause is not None and error_code(cause):
            raise storage_error(cause, "downloading", src.bucket, src.key) from e
        raise


def fetch(client: Any, src: Source, cache_root: Path, *, expected_sha256: str | None = None, force: bool = False,
          settings: TransferSettings = DEFAULT_TRANSFER) -> Synced:
    """One object into the cache: skipped when unchanged, else downloaded to a temp name, hashed, verified, renamed."""
    file, sidecar = cache_paths(cache_root, src)
    meta = None if force else _cached(file, sidecar, src)
    if meta is not None:
        if expected_sha256 and meta["sha256"] != expected_sha256:
            raise _mismatch(src, meta["sha256"], expected_sha256)
        return Synced(src.name, str(file), src.size, meta["sha256"], downloaded=False)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _transfer(client, src, tmp, settings)
        size = tmp.stat().st_size
        if size != src.size:
            raise BadInputError(f"{src.uri} changed while it was synced (listed {src.size} bytes, got {size}); "
                                "the checkpoint is still being written: rerun when training has finished it")
        digest = sha256_file(tmp)
        if expected_sha256 and digest != expected_sha256:
            raise _mismatch(src, digest, expected_sha256)
        tmp.replace(file)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_bytes(sidecar, json.dumps({"etag": src.etag, "size": src.size, "sha256": digest,
                                            "mtime_ns": file.stat().st_mtime_ns, "uri": src.uri}).encode())
    return Synced(src.name, str(file), src.size, digest, downloaded=True)


def _mismatch(src: Source, got: str, expected: str) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        f"sha256 mismatch for {src.uri}: computed {got}, but {CHECKSUM_FILE} says {expected}; the checkpoint is "
        "corrupt or was rewritten after its checksum file: fix or re-upload it (nothing was written to the workdir)",
        details={"uri": src.uri, "sha256": got, "expected": expected})


def fetch_all(client: Any, sources: list[Source], cache_root: Path, *, expected: dict[str, str] | None = None,
              force: bool = False, settings: TransferSettings = DEFAULT_TRANSFER) -> list[Synced]:
    """Fetch several objects, `settings.max_files` at a time; results in input order."""
    expected = expected or {}
    started = time.monotonic()

    def one(src: Source) -> Synced:
        return fetch(client, src, cache_root, expected_sha256=expected.get(src.name), force=force, settings=settings)

    with ThreadPoolExecutor(max_workers=max(1, settings.max_files)) as pool:
        results = list(pool.map(one, sources))
    moved = sum(r.size for r in results if r.downloaded)
    seconds = time.monotonic() - started
    log.info("synced %d object(s): %d downloaded (%.1f MB in %.2fs, %.1f MB/s), %d unchanged in the cache",
             len(results), sum(r.downloaded for r in results), moved / MB, seconds,
             moved / MB / seconds if seconds > 0 else 0.0, sum(not r.downloaded for r in results))
    return results


# --------------------------------------------------------------------------------------------- checkpoint
def checkpoint_sources(checkpoint: Checkpoint, spec: CheckpointSpec) -> list[Source]:
    files = checkpoint.payload(spec)
    names = [f.name for f in files]
    if spec.filename not in names:
        raise BadInputError(
            f"checkpoint {checkpoint.uri} has no '{spec.filename}' (it has {names[:20]}); set checkpoint.filename "
            "in the export config to the weights file training writes")
    return [Source(f.name, checkpoint.bucket, f.source, f.size, f.etag) for f in files]


def expected_checksums(client: Any, checkpoint: Checkpoint) -> dict[str, str]:
    """The training side's SHA256SUMS for this folder ({} when it wrote none)."""
    entry = next((f for f in checkpoint.files if f.name == CHECKSUM_FILE), None)
    if entry is None:
        return {}
    if checkpoint.bucket is None:
        text = Path(entry.source).read_text()
    else:
        got = get_bytes(client, checkpoint.bucket, entry.source)
        text = got[0].decode() if got else ""
    sums = parse_sha256sums(text, checkpoint.uri + CHECKSUM_FILE)
    names = {f.name for f in checkpoint.files}
    missing = sorted(set(sums) - names)
    if missing:
        raise BadInputError(f"{checkpoint.uri}{CHECKSUM_FILE} lists {missing}, which are not in the folder: "
                            "the checkpoint is incomplete or the checksum file is stale")
    return sums


def data_source(client: Any, uri: str) -> Source:
    loc = parse_s3_uri(uri)
    meta = head(client, loc.bucket, loc.key)
    if meta is None:
        raise BadInputError(f"data file {uri} does not exist; fix the path in the export config or upload it")
    name = loc.key.rsplit("/", 1)[-1]
    return Source(name, loc.bucket, loc.key, int(meta["ContentLength"]), meta["ETag"].strip('"'))


# ------------------------------------------------------------------------------------------- work directory
def place(synced: list[Synced], dest: Path) -> None:
    """Hardlink (or copy, across filesystems) verified cache files into `dest`, each via a temp name + rename."""
    for s in synced:
        target = _inside(dest, s.name)
        if target.exists() and target.samefile(s.path):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(s.path, tmp)
        except OSError:
            shutil.copyfile(s.path, tmp)
        tmp.replace(target)


def summary(synced: list[Synced]) -> dict[str, int]:
    return {"bytes_downloaded": sum(s.size for s in synced if s.downloaded),
            "objects_downloaded": sum(s.downloaded for s in synced),
            "objects_skipped": sum(not s.downloaded for s in synced)}


def as_records(synced: list[Synced]) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(s).items() if k in ("name", "size", "sha256")} for s in synced]
