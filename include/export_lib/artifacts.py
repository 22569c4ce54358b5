"""Artifact directories written atomically, file inventories and library versions for step results."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


# A staging directory untouched for this long belongs to a killed step (the longest step timeout is hours, not
# this): removing it then cannot race a live writer, such as a zombie pod still finishing on a shared volume.
STALE_AFTER_S = 12 * 3600


def remove_stale(parent: Path, pattern: str, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete leftovers of killed steps (`pattern` glob in `parent`) not modified for `older_than_s`."""
    removed = []
    cutoff = time.time() - older_than_s
    for p in Path(parent).glob(pattern):
        try:
            if p.is_dir() and p.stat().st_mtime < cutoff:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        except FileNotFoundError:  # another process cleaned it first
            continue
    if removed:
        log.info("removed %d stale staging dir(s) of killed runs: %s", len(removed), [p.name for p in removed])
    return removed


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success it replaces `final` by rename.

    On any exception the temporary directory is removed and an existing `final` is left untouched, so a failed
    step never leaves a partial artifact.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("tmp", "old"):
        remove_stale(final.parent, f".{final.name}.{kind}-*")
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the artifact is read by other steps/pods and uploaded
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        # Directories cannot be replaced by rename while non-empty: move the old one aside first.
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
        final.replace(old / final.name)
    tmp.replace(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_inventory(directory: Path) -> dict[str, int]:
    """{relative path: size in bytes} of every file in an artifact directory."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact (tensorrt only where importable)."""
    out = {}
    for name in ("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt", "polygraphy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # absent (or broken): not part of this artifact
            continue
    return out
