"""Orchestration for the export engine: where each `python -m export_lib <step>` runs and what it returns.

Importing this package puts the repository's `include/` on sys.path (see `operators.paths`).
"""

from operators import paths as _paths  # noqa: F401  (side effect: include/ on sys.path)
