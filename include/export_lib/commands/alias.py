"""`alias`: set, get or show the history of a model's `staging` / `production` alias."""

from __future__ import annotations

import argparse
import json

from export_lib.commands._common import add_model_arguments, load_model
from export_lib.results import BadInputError
from export_lib.storage.aliases import ALIASES, alias_history, default_actor, resolve_alias, set_alias
from export_lib.storage.s3 import make_client
from export_lib.storage.store import Store

HELP = "move (set), resolve (get) or audit (history) a model's staging/production alias"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, workdir=False)
    parser.add_argument("action", choices=("set", "get", "history"))
    parser.add_argument("--alias", choices=ALIASES, help="required for set and get; history shows all without it")
    parser.add_argument("--version", help="set: the published version to point at")
    parser.add_argument("--expect-from", default=None,
                        help="set: only move if the alias currently points to this version (else a conflict)")
    parser.add_argument("--reason", default="", help="set: why, recorded in the audit log")
    parser.add_argument("--actor", default=None, help="set: who, recorded in the audit log "
                                                      "(default: $EXPORT_ACTOR or user@host)")


def run(args: argparse.Namespace) -> dict:
    config, spec = load_model(args)
    store, client = Store.from_config(config), make_client()
    if args.action == "history":
        result = {"model": spec.name, "alias": args.alias,
                  "history": alias_history(client, store, spec.name, args.alias)}
        print(json.dumps(result, indent=2))
        return result
    if not args.alias:
        raise BadInputError(f"`alias {args.action}` needs --alias ({' or '.join(ALIASES)})")
    if args.action == "get":
        pointer = resolve_alias(client, store, spec.name, args.alias)
        result = {"model": spec.name, "alias": args.alias, "version": pointer and pointer["version"],
                  "pointer": pointer}
        print(json.dumps(result, indent=2))
        return result
    if not args.version:
        raise BadInputError("`alias set` needs --version V (a published version; see `versions`)")
    return set_alias(client, store, spec.name, args.alias, args.version, actor=args.actor or default_actor(),
                     reason=args.reason, expected_from=args.expect_from)
