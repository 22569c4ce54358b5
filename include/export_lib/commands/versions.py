"""`versions`: the published versions of a model (newest first) and where its aliases point."""

from __future__ import annotations

import argparse
import json

from export_lib.commands._common import add_model_arguments, load_model
from export_lib.storage.aliases import aliased_versions
from export_lib.storage.s3 import make_client
from export_lib.storage.store import Store, list_versions

HELP = "list a model's published versions (only those with a manifest), newest first"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, workdir=False)


def run(args: argparse.Namespace) -> dict:
    config, spec = load_model(args)
    store, client = Store.from_config(config), make_client()
    result = {"model": spec.name, "store": store.uri(store.model_prefix(spec.name)),
              "versions": list_versions(client, store, spec.name),
              "aliases": aliased_versions(client, store, spec.name)}
    print(json.dumps(result, indent=2))
    return result
