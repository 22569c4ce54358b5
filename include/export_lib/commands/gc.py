"""`gc`: retention for a model's versions; a dry run unless --apply; aliased versions are never deleted."""

from __future__ import annotations

import argparse
import json

from export_lib.commands._common import add_model_arguments, load_model
from export_lib.storage.gc import collect
from export_lib.storage.s3 import make_client
from export_lib.storage.store import Store

HELP = "delete old versions (keep the newest N and/or those younger than D days, and every aliased one)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, workdir=False)
    parser.add_argument("--keep", type=int, required=True, help="always keep the newest N published versions")
    parser.add_argument("--max-age-days", type=float, default=None,
                        help="also keep every version younger than this many days")
    parser.add_argument("--incomplete-grace-hours", type=float, default=24.0,
                        help="delete folders without a manifest (interrupted publishes) untouched this long")
    parser.add_argument("--apply", action="store_true", help="really delete (default: only print the plan)")


def run(args: argparse.Namespace) -> dict:
    config, spec = load_model(args)
    result = collect(make_client(), Store.from_config(config), spec.name, keep=args.keep,
                     max_age_days=args.max_age_days, apply=args.apply,
                     incomplete_grace_hours=args.incomplete_grace_hours)
    print(json.dumps(result, indent=2))
    return result
