"""`manifest`: read a published version's manifest.json, by version id or through an alias."""

from __future__ import annotations

import argparse
import json

from export_lib.commands._common import add_model_arguments, load_model
from export_lib.results import BadInputError
from export_lib.storage.aliases import ALIASES, resolve_alias
from export_lib.storage.s3 import make_client
from export_lib.storage.store import Store, get_manifest

HELP = "print a published version's manifest (--version V or --alias staging|production)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, workdir=False)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="version id (see `versions`)")
    which.add_argument("--alias", choices=ALIASES, help="the version this alias points to")


def run(args: argparse.Namespace) -> dict:
    config, spec = load_model(args)
    store, client = Store.from_config(config), make_client()
    version = args.version
    if args.alias:
        pointer = resolve_alias(client, store, spec.name, args.alias)
        if pointer is None:
            raise BadInputError(f"alias '{args.alias}' of model '{spec.name}' is not set; set it with "
                                f"`alias --model {spec.name} set --alias {args.alias} --version V`")
        version = pointer["version"]
    manifest = get_manifest(client, store, spec.name, version)
    print(json.dumps(manifest, indent=2, sort_keys=True))
    return {"model": spec.name, "version": version, "alias": args.alias,
            "manifest_uri": store.uri(store.key(spec.name, version, "manifest.json")),
            "selected_variant": manifest.get("selected_variant")}
