"""Step results and exit codes: the contract between the engine and the orchestrator.

Light module (no torch). A step's result is a small JSON document (paths and figures, never tensors).
"""

from __future__ import annotations

import enum
import json
import os
import tempfile
from pathlib import Path
from typing import Any

# Where KubernetesPodOperator's XCom sidecar reads the result (overridable for tests and other runners).
XCOM_RETURN_PATH = Path(os.environ.get("EXPORT_XCOM_RETURN_PATH", "/airflow/xcom/return.json"))


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1  # a bug or an unexpected failure: the traceback is in the log
    BAD_INPUT = 2  # config, checkpoint, data or usage problem: the message names the thing and the fix
    VALIDATION_FAILED = 3  # parity / accuracy / expectation failure: the report names output and figures
    CAPABILITY_MISSING = 4  # e.g. TensorRT not installed for a tensorrt-* variant


class ExportError(Exception):
    """An expected failure with a message for the user and the exit code it maps to."""

    exit_code = ExitCode.INTERNAL

    def __init__(self, message: str, *, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.details = details or {}


class BadInputError(ExportError):
    exit_code = ExitCode.BAD_INPUT


class ValidationFailedError(ExportError):
    exit_code = ExitCode.VALIDATION_FAILED


class CapabilityMissingError(ExportError):
    exit_code = ExitCode.CAPABILITY_MISSING


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def emit_result(result: dict[str, Any], *, workdir: Path | None, step: str,
                result_file: Path | None = None, xcom: bool = False) -> None:
    """Write a step's result where each runtime looks for it."""
    if workdir is not None:
        write_json(Path(workdir) / "results" / f"{step}.json", result)
    if result_file is not None:
        write_json(Path(result_file), result)
    if xcom:
        write_json(XCOM_RETURN_PATH, result)
