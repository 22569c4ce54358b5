"""CLI command modules (see export_lib.cli)."""
