"""Which runtime runs the export steps, and which export config the pipeline uses.

Both are configuration, never DAG edits:
- runtime: Airflow Variable `export_runtime`, else env `EXPORT_RUNTIME`, else `local`;
- config: Airflow Variable `export_config`, else env `EXPORT_CONFIG`, else `include/config/export.yaml`.

`Variable.get` consults the secrets backends first (e.g. `AIRFLOW_VAR_EXPORT_RUNTIME`), then the metastore.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from export_lib.config import ConfigError, ExportConfig, load_config
from operators.paths import DEFAULT_CONFIG_PATH, REPO_ROOT

Runtime = Literal["local", "kubernetes"]
RUNTIMES: tuple[Runtime, ...] = ("local", "kubernetes")


def _variable(key: str) -> str | None:
    from airflow.sdk import Variable

    value = Variable.get(key, default=None)
    return value.strip() if isinstance(value, str) and value.strip() else None


def resolve_runtime() -> Runtime:
    value = (_variable("export_runtime") or os.environ.get("EXPORT_RUNTIME") or "local").strip().lower()
    if value not in RUNTIMES:
        raise ConfigError(
            f"export runtime '{value}' is not one of {list(RUNTIMES)}: fix the Airflow Variable `export_runtime` "
            "or the EXPORT_RUNTIME environment variable"
        )
    return value  # type: ignore[return-value]


def resolve_config_path() -> Path:
    raw = _variable("export_config") or os.environ.get("EXPORT_CONFIG")
    if not raw:
        return DEFAULT_CONFIG_PATH
    path = Path(raw).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> ExportConfig:
    # mtime in the key: an edited file is re-read on the next parse, an unchanged one is not re-validated.
    return load_config(path)


def load_export_config(path: Path | None = None) -> ExportConfig:
    path = Path(path) if path is not None else resolve_config_path()
    if not path.is_file():
        raise ConfigError(
            f"export config '{path}' does not exist: set the Airflow Variable `export_config` or EXPORT_CONFIG"
        )
    return _load_cached(str(path), path.stat().st_mtime_ns)


def local_workspace(config: ExportConfig) -> Path:
    """The workspace of the local runtime (relative paths in the config are relative to the repository root)."""
    path = Path(config.pipeline.workspace).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path
