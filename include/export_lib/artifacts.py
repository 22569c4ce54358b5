"""Artifact directories written atomically, file inventories and library versions for step results."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success it replaces `final` by rename.

    On any exception the temporary directory is removed and an existing `final` is left untouched, so a failed
    step never leaves a partial artifact.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
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
