"""`python -m export_lib <command> ...`: one entry point for pods and local processes.

Each command lives in its own module, imported only when that command runs (so `sync` never pays for importing
torch). A command module defines:

    HELP = "one line"
    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> dict      # the step's JSON result

Errors derived from `export_lib.results.ExportError` map to their exit code with a one-paragraph message;
anything else is an internal error (exit 1) with the traceback in the log.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from pathlib import Path

from export_lib.config import ConfigError
from export_lib.results import ExitCode, ExportError, emit_result

# command -> module (imported lazily)
COMMANDS: dict[str, str] = {
    "sync": "export_lib.commands.sync",
    "convert": "export_lib.commands.convert",
    "calibrate": "export_lib.commands.calibrate",
    "validate": "export_lib.commands.validate",
    "benchmark": "export_lib.commands.benchmark",
    "select": "export_lib.commands.select",
    "publish": "export_lib.commands.publish",
    "versions": "export_lib.commands.versions",
    "manifest": "export_lib.commands.manifest",
    "alias": "export_lib.commands.alias",
    "gc": "export_lib.commands.gc",
}

log = logging.getLogger("export_lib")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=os.environ.get("EXPORT_CONFIG"),
                        help="export config YAML (default: $EXPORT_CONFIG)")
    parser.add_argument("--result-file", type=Path, help="also write the JSON result here")
    parser.add_argument("--xcom", action="store_true",
                        help="also write the result to /airflow/xcom/return.json (KubernetesPodOperator sidecar)")
    parser.add_argument("--log-level", default=os.environ.get("EXPORT_LOG_LEVEL", "INFO"))


def _usage() -> str:
    lines = ["usage: python -m export_lib <command> [options]", "", "commands:"]
    for name, mod in COMMANDS.items():
        lines.append(f"  {name:<10} {mod.rsplit('.', 1)[-1]}")
    lines.append("\n`python -m export_lib <command> --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return ExitCode.OK if argv else ExitCode.BAD_INPUT
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command '{name}'; choose one of {sorted(COMMANDS)}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    module = importlib.import_module(COMMANDS[name])
    parser = argparse.ArgumentParser(prog=f"python -m export_lib {name}", description=module.HELP)
    _common(parser)
    module.add_arguments(parser)
    try:
        args = parser.parse_args(rest)
    except SystemExit as e:  # argparse already printed the problem
        return ExitCode.OK if e.code == 0 else ExitCode.BAD_INPUT
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = getattr(args, "workdir", None)
    started = time.monotonic()
    try:
        result = module.run(args)
        code = ExitCode.OK
    except (ExportError, ConfigError) as e:
        code = getattr(e, "exit_code", ExitCode.BAD_INPUT)
        log.error("%s failed (%s): %s", name, code.name, e)
        result = {"status": "failed", "exit_code": int(code), "error": str(e),
                  "details": getattr(e, "details", {})}
    except Exception as e:
        log.exception("%s failed with an internal error", name)
        code = ExitCode.INTERNAL
        result = {"status": "failed", "exit_code": int(code), "error": f"{type(e).__name__}: {e}"}
    result = {"step": name, "status": "ok", **result, "seconds": round(time.monotonic() - started, 3)}
    # On failure, keep the result (error message) but never publish it to XCom as a success.
    workdir = result.get("workdir", workdir)
    emit_result(result, workdir=Path(workdir) if workdir else None, step=name,
                result_file=args.result_file, xcom=args.xcom and code == ExitCode.OK)
    return int(code)
