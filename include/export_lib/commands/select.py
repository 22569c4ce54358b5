"""`select`: choose the variant to serve from the validation and benchmark reports (reports/selection.json)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from export_lib.commands._common import add_model_arguments, load_model
from export_lib.results import BadInputError, ValidationFailedError, read_json, write_json
from export_lib.workdir import report_path

HELP = "choose the fastest variant that passed validation (INT8 only when faster than its FP counterpart)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="compare p50 latency at this batch size (default: the largest of benchmark.batch_sizes)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from export_lib.select import select_variant

    _, spec = load_model(args)
    reports = {}
    for name, step in (("validation", "validate"), ("benchmark", "benchmark")):
        path = report_path(args.workdir, name)
        if not path.is_file():
            raise BadInputError(f"no {name} report at {path}: run `{step}` for this workdir first")
        reports[name] = read_json(path)
    if reports["validation"].get("passed") is False:
        # Strict validation failed (exit 3): the model's run stops here, whatever a later hand-run step does.
        raise ValidationFailedError(
            f"the validation report {report_path(args.workdir, 'validation')} failed: "
            + "; ".join(reports["validation"].get("failures") or ["see the report"])
            + ". Nothing is selected (so nothing can be published); fix the cause and rerun validate, or list the "
            "failing variant under validation.optional_variants to ship the others without it",
            details={"report": str(report_path(args.workdir, "validation"))})
    if args.batch_size is not None and args.batch_size not in reports["benchmark"]["settings"]["batch_sizes"]:
        raise BadInputError(f"--batch-size {args.batch_size} was not benchmarked (batch sizes: "
                            f"{reports['benchmark']['settings']['batch_sizes']})")
    selection = select_variant(spec.variants, reports["validation"], reports["benchmark"], args.batch_size)
    write_json(report_path(args.workdir, "selection"), selection)
    for v, d in selection["decisions"].items():
        log.info("select %s: %s %s: %s", spec.name, v, "CHOSEN" if d["chosen"] else "not chosen", d["reason"])
    return {"model": spec.name, "workdir": str(args.workdir), "selected": selection["selected"],
            "batch_size": selection["batch_size"], "p50_ms": selection["p50_ms"],
            "report": str(report_path(args.workdir, "selection"))}
