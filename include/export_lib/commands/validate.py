"""`validate`: parity and accuracy of every built variant against torch eager (reports/validation.json)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from export_lib.commands._common import add_model_arguments, load_model

HELP = "compare each built variant with torch eager (parity per output, accuracy, great-expectations suite)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for torch and onnxruntime (default: spec.benchmark.threads)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from export_lib.validate import validate

    _, spec = load_model(args)
    return validate(spec, args.workdir, config_dir=Path(args.config).resolve().parent,
                    threads=args.threads or spec.benchmark.threads)
