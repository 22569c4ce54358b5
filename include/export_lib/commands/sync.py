"""`sync`: newest complete checkpoint (or a pinned one) + the spec's s3:// data files -> the version's workdir."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from export_lib.commands._common import add_model_arguments, load_model
from export_lib.results import BadInputError
from export_lib.storage.checkpoints import checkpoint_at, discover
from export_lib.storage.s3 import make_client
from export_lib.storage.store import Store, checkpoint_digest, manifest_exists, version_id
from export_lib.storage.sync import (
    as_records,
    checkpoint_sources,
    data_source,
    expected_checksums,
    fetch_all,
    place,
    summary,
)
from export_lib.workdir import checkpoint_dir, data_dir

HELP = "sync the newest complete checkpoint and the data files into <workspace>/<model>/<version>/"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, workdir=False)
    parser.add_argument("--workspace", type=Path, default=None,
                        help="local directory or PVC mount holding work dirs and the sync cache "
                             "(default: pipeline.workspace from the config)")
    parser.add_argument("--checkpoint-uri", default=None,
                        help="pin one checkpoint folder (s3://.../<step>/) instead of discovering the newest")
    parser.add_argument("--force", action="store_true", help="download again even what the cache already holds")


def ensure_writable(workspace: Path) -> None:
    """Fail before any transfer, naming the workspace, when it cannot be created or written."""
    try:
        workspace.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workspace, prefix=".write-check-"):
            pass
    except OSError as e:
        raise BadInputError(
            f"workspace '{workspace}' is not a writable directory ({e.strerror or e}); set pipeline.workspace in "
            "the config or pass --workspace (in pods: the workspace PVC's mount path)") from None


def run(args: argparse.Namespace) -> dict:
    config, spec = load_model(args)
    client = make_client()
    workspace = Path(args.workspace or config.pipeline.workspace)
    cache = workspace / ".cache"
    ensure_writable(workspace)
    ckpt = (checkpoint_at(client, spec.checkpoint, args.checkpoint_uri) if args.checkpoint_uri
            else discover(client, spec.checkpoint))
    expected = expected_checksums(client, ckpt)
    synced = fetch_all(client, checkpoint_sources(ckpt, spec.checkpoint), cache, expected=expected, force=args.force)
    ckpt_digest = checkpoint_digest((s.name, s.sha256) for s in synced)
    config_digest = spec.digest()
    version = version_id(ckpt_digest, config_digest)
    workdir = workspace / spec.name / version
    place(synced, checkpoint_dir(workdir))

    data_uris = [u for u in spec.data_uris().values() if u.startswith("s3://")]
    data = fetch_all(client, [data_source(client, u) for u in data_uris], cache, force=args.force) if data_uris else []
    place(data, data_dir(workdir))

    published = manifest_exists(client, Store.from_config(config), spec.name, version)
    if published:
        log.info("version %s of %s is already published: the export steps can be skipped", version, spec.name)
    moved = summary(synced + data)
    return {
        "workdir": str(workdir),
        "model": spec.name,
        "version": version,
        "checkpoint_uri": ckpt.uri,
        "checkpoint_step": ckpt.step,
        "checkpoint_digest": ckpt_digest,
        "checkpoint_verified": sorted(expected),
        "checkpoint_files": as_records(synced),
        "data_files": as_records(data),
        "config_digest": config_digest,
        "published": published,
        **moved,
    }
