"""Checkpoint discovery and incremental, verified sync against a moto server over HTTP."""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from storage_helpers import TRAIN, make_buckets, put_checkpoint, sha, spec_of, write_config

from export_lib.results import BadInputError
from export_lib.storage.checkpoints import checkpoint_at, discover, list_checkpoints, step_number
from export_lib.storage.store import checkpoint_digest
from export_lib.storage.sync import (
    ChecksumMismatchError,
    TransferSettings,
    cache_paths,
    checkpoint_sources,
    expected_checksums,
    fetch_all,
    parse_sha256sums,
    place,
    summary,
)

MB = 1024 * 1024


@pytest.fixture
def s3(s3_client):
    make_buckets(s3_client)
    return s3_client


def _spec(tmp_path, **kw):
    return spec_of(write_config(tmp_path, **kw))


def test_step_number_is_last_run_of_digits():
    assert step_number("step-001200") == 1200
    assert step_number("epoch3-step500") == 500
    assert step_number("final") is None


def test_newest_complete_by_step_ignores_incomplete_newer(s3, tmp_path):
    put_checkpoint(s3, "step-100", {"model.safetensors": b"a" * 10})
    put_checkpoint(s3, "step-900", {"model.safetensors": b"b" * 10})
    put_checkpoint(s3, "step-1000", {"model.safetensors": b"c" * 10}, marker=None)  # still being written
    spec = _spec(tmp_path)
    found = {c.name: c for c in list_checkpoints(s3, spec.checkpoint)}
    assert not found["step-1000"].complete and "marker '_COMPLETE' missing" in found["step-1000"].reason
    best = discover(s3, spec.checkpoint)
    # numeric, not lexical: 900 < 1000 but step-1000 is incomplete; step-900 beats step-100
    assert best.name == "step-900" and best.step == 900
    assert best.uri == f"s3://{TRAIN}/digits/step-900/"
    assert [f.name for f in best.payload(spec.checkpoint)] == ["model.safetensors"]


def test_newest_by_time(s3, tmp_path):
    put_checkpoint(s3, "run-b", {"model.safetensors": b"old"})
    time.sleep(1.1)  # S3 LastModified has one-second resolution on some stores
    put_checkpoint(s3, "run-a", {"model.safetensors": b"new"})
    assert discover(s3, _spec(tmp_path, select="time").checkpoint).name == "run-a"


def test_quiescence_rule_without_marker(s3, tmp_path):
    put_checkpoint(s3, "step-5", {"model.safetensors": b"x"}, marker=None)
    spec = _spec(tmp_path, marker=None, quiescence=60)
    with pytest.raises(BadInputError) as e:
        discover(s3, spec.checkpoint)
    assert "none of its objects changed for 60s" in str(e.value) and f"s3://{TRAIN}/digits/" in str(e.value)
    later = datetime.now(UTC) + timedelta(seconds=120)
    assert discover(s3, spec.checkpoint, now=later).name == "step-5"


def test_no_complete_checkpoint_names_prefix_and_rule(s3, tmp_path):
    put_checkpoint(s3, "step-1", {"model.safetensors": b"x"}, marker=None)
    with pytest.raises(BadInputError) as e:
        discover(s3, _spec(tmp_path).checkpoint)
    msg = str(e.value)
    assert f"no complete checkpoint under s3://{TRAIN}/digits/" in msg
    assert "marker object '_COMPLETE'" in msg and "step-1: marker '_COMPLETE' missing" in msg


def test_pinned_checkpoint_must_be_complete(s3, tmp_path):
    uri = put_checkpoint(s3, "step-7", {"model.safetensors": b"x"}, marker=None)
    spec = _spec(tmp_path)
    with pytest.raises(BadInputError, match="is not complete"):
        checkpoint_at(s3, spec.checkpoint, uri)
    put_checkpoint(s3, "step-8", {"model.safetensors": b"y"})
    assert checkpoint_at(s3, spec.checkpoint, f"s3://{TRAIN}/digits/step-8").step == 8


def test_resync_moves_zero_bytes_and_changed_object_only(s3, tmp_path):
    files = {"model.safetensors": os.urandom(3 * MB), "config.json": b'{"a": 1}', "sub/extra.bin": b"e" * 100}
    put_checkpoint(s3, "step-1", files)
    spec = _spec(tmp_path)
    cache = tmp_path / "ws" / ".cache"
    ckpt = discover(s3, spec.checkpoint)
    first = fetch_all(s3, checkpoint_sources(ckpt, spec.checkpoint), cache)
    assert summary(first) == {"bytes_downloaded": sum(map(len, files.values())), "objects_downloaded": 3,
                              "objects_skipped": 0}
    assert {s.name: s.sha256 for s in first} == {n: sha(d) for n, d in files.items()}

    again = fetch_all(s3, checkpoint_sources(discover(s3, spec.checkpoint), spec.checkpoint), cache)
    assert summary(again) == {"bytes_downloaded": 0, "objects_downloaded": 0, "objects_skipped": 3}
    assert checkpoint_digest((s.name, s.sha256) for s in again) == checkpoint_digest((s.name, s.sha256) for s in first)

    s3.put_object(Bucket=TRAIN, Key="digits/step-1/config.json", Body=b'{"a": 2}')
    third = fetch_all(s3, checkpoint_sources(discover(s3, spec.checkpoint), spec.checkpoint), cache)
    assert summary(third) == {"bytes_downloaded": 8, "objects_downloaded": 1, "objects_skipped": 2}

    # a locally tampered cache file is noticed (mtime/size no longer match the sidecar) and fetched again
    cached, _ = cache_paths(cache, checkpoint_sources(ckpt, spec.checkpoint)[0])
    Path(cached).write_bytes(b"tampered")
    fourth = fetch_all(s3, checkpoint_sources(ckpt, spec.checkpoint), cache)
    assert summary(fourth)["objects_downloaded"] == 1


def test_multipart_parallel_download_logs_progress(s3, tmp_path, caplog):
    data = os.urandom(24 * MB)
    put_checkpoint(s3, "step-1", {"model.safetensors": data})
    spec = _spec(tmp_path)
    settings = TransferSettings(multipart_threshold=5 * MB, multipart_chunksize=5 * MB, max_concurrency=4,
                                progress_interval_s=0.0)
    caplog.set_level(logging.INFO, logger="export_lib.storage.sync")
    started = time.monotonic()
    [got] = fetch_all(s3, checkpoint_sources(discover(s3, spec.checkpoint), spec.checkpoint),
                      tmp_path / "cache", settings=settings)
    seconds = time.monotonic() - started
    assert got.sha256 == sha(data) and got.downloaded
    progress = [r.getMessage() for r in caplog.records if "% (" in r.getMessage()]
    assert progress and progress[-1].endswith("100% (24.0 / 24.0 MB)")
    assert any("MB/s" in r.getMessage() for r in caplog.records)
    print(f"24 MB multipart download: {seconds:.2f}s ({24 / seconds:.0f} MB/s)")


def test_checksum_file_verified_and_mismatch_names_the_key(s3, tmp_path):
    good = {"model.safetensors": b"weights", "tokenizer.json": b"{}"}
    put_checkpoint(s3, "step-1", good, sums=True)
    spec = _spec(tmp_path)
    ckpt = discover(s3, spec.checkpoint)
    expected = expected_checksums(s3, ckpt)
    assert expected == {n: sha(d) for n, d in good.items()}
    synced = fetch_all(s3, checkpoint_sources(ckpt, spec.checkpoint), tmp_path / "c1", expected=expected)
    assert {s.name for s in synced} == set(good)  # SHA256SUMS and the marker are not checkpoint content

    put_checkpoint(s3, "step-2", good, sums={"model.safetensors": "0" * 64, "tokenizer.json": sha(b"{}")})
    ckpt2 = discover(s3, spec.checkpoint)
    assert ckpt2.name == "step-2"
    cache = tmp_path / "c2"
    with pytest.raises(ChecksumMismatchError) as e:
        fetch_all(s3, checkpoint_sources(ckpt2, spec.checkpoint), cache, expected=expected_checksums(s3, ckpt2))
    assert f"s3://{TRAIN}/digits/step-2/model.safetensors" in str(e.value) and "0" * 64 in str(e.value)
    # nothing unverified is left in the cache under the final name, and no temp files linger
    leftovers = [p for p in cache.rglob("*") if p.is_file() and "model.safetensors" in p.name]
    assert leftovers == []


def test_checksum_file_format_errors(s3, tmp_path):
    assert parse_sha256sums(f"# comment\n{'a' * 64} *./w.bin\n\n", "X") == {"w.bin": "a" * 64}
    with pytest.raises(BadInputError, match="line 1 is not"):
        parse_sha256sums("nothex  file\n", "s3://b/k/SHA256SUMS")
    put_checkpoint(s3, "step-3", {"model.safetensors": b"w"}, sums={"model.safetensors": sha(b"w"),
                                                                    "missing.bin": "b" * 64})
    with pytest.raises(BadInputError, match=r"lists \['missing.bin'\]"):
        expected_checksums(s3, discover(s3, _spec(tmp_path).checkpoint))


def test_missing_weights_file_is_a_clear_error(s3, tmp_path):
    put_checkpoint(s3, "step-1", {"weights.pt": b"w"})
    spec = _spec(tmp_path)
    with pytest.raises(BadInputError, match="has no 'model.safetensors'.*checkpoint.filename"):
        checkpoint_sources(discover(s3, spec.checkpoint), spec.checkpoint)


def test_place_hardlinks_into_workdir(s3, tmp_path):
    put_checkpoint(s3, "step-1", {"model.safetensors": b"w" * 1000, "sub/a.json": b"{}"})
    spec = _spec(tmp_path)
    synced = fetch_all(s3, checkpoint_sources(discover(s3, spec.checkpoint), spec.checkpoint), tmp_path / "cache")
    dest = tmp_path / "wd" / "checkpoint"
    place(synced, dest)
    place(synced, dest)  # idempotent
    assert (dest / "model.safetensors").read_bytes() == b"w" * 1000
    assert (dest / "sub" / "a.json").samefile(next(s.path for s in synced if s.name == "sub/a.json"))


def test_local_directory_checkpoints(tmp_path):
    base = tmp_path / "ckpts"
    for step, complete in ((10, True), (20, False)):
        d = base / f"step-{step}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"w%d" % step)
        if complete:
            (d / "_COMPLETE").write_text("")
    spec = _spec(tmp_path, checkpoint_uri=str(base))
    ckpt = discover(None, spec.checkpoint)
    assert ckpt.name == "step-10" and ckpt.bucket is None
    cache = tmp_path / "cache"
    first = fetch_all(None, checkpoint_sources(ckpt, spec.checkpoint), cache)
    again = fetch_all(None, checkpoint_sources(ckpt, spec.checkpoint), cache)
    assert first[0].sha256 == sha(b"w10") and summary(again)["objects_skipped"] == 1


def test_same_implementation_runs_on_an_s3hook_client(s3, tmp_path):
    """The Airflow side passes `S3Hook(aws_conn_id).get_conn()` (the `aws_default` connection, not the pod's
    environment) to the very same discovery and sync functions."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    files = {"model.safetensors": b"w" * 4096}
    put_checkpoint(s3, "step-7", files, sums=True)
    spec = _spec(tmp_path)
    hook_client = S3Hook(aws_conn_id="aws_default").get_conn()
    ckpt = discover(hook_client, spec.checkpoint)
    synced = fetch_all(hook_client, checkpoint_sources(ckpt, spec.checkpoint), tmp_path / "cache",
                       expected=expected_checksums(hook_client, ckpt))
    assert ckpt.name == "step-7" and [(s.name, s.sha256) for s in synced] == [("model.safetensors", sha(files[
        "model.safetensors"]))]
    place(synced, tmp_path / "work" / "checkpoint")
    assert (tmp_path / "work" / "checkpoint" / "model.safetensors").read_bytes() == files["model.safetensors"]
