"""`benchmark`: interleaved latency/throughput of validated variants and torch eager (reports/benchmark.json)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from export_lib.commands._common import add_model_arguments, load_model

HELP = "benchmark every validated variant against torch eager, interleaved, until stable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a previous benchmark.json or a published manifest.json to flag p50 regressions against")
    parser.add_argument("--fail-on-regression", action="store_true",
                        help="exit 3 when a regression beyond benchmark.regression_threshold is found "
                             "(default: record it in the report only)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for torch and onnxruntime (default: spec.benchmark.threads)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from export_lib.benchmark import benchmark

    _, spec = load_model(args)
    return benchmark(spec, args.workdir, baseline=args.baseline, fail_on_regression=args.fail_on_regression,
                     threads=args.threads)
