"""Where the repository's parts live, and `include/` on sys.path for the Airflow side.

The scheduler, DAG processor and workers import `export_lib.config` / `export_lib.storage` (light modules, no torch)
from the repository's `include/`; in the engine image the same packages are pip-installed instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# Astronomer / Helm / docker-compose ship include/ beside plugins/. Where it lives elsewhere (e.g. MWAA, whose
# plugins come from a zip) point EXPORT_INCLUDE_DIR at it, or `pip install .` the engine package into the image.
INCLUDE_DIR = Path(os.environ.get("EXPORT_INCLUDE_DIR") or REPO_ROOT / "include")
DEFAULT_CONFIG_PATH = INCLUDE_DIR / "config" / "export.yaml"


def ensure_include_on_path() -> None:
    if INCLUDE_DIR.is_dir() and str(INCLUDE_DIR) not in sys.path:
        sys.path.insert(0, str(INCLUDE_DIR))


ensure_include_on_path()
