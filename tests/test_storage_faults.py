"""Faults between us and S3: throttling and 5xx (retried), permanent 403 (clear error), stores without
conditional writes (degrade), and a publisher killed between uploads (no manifest; the next run completes it).
Faults are injected by a small HTTP proxy in front of the moto server."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from storage_helpers import (
    EXPORTS,
    REPO,
    TRAIN,
    FaultProxy,
    fake_export_outputs,
    make_buckets,
    put_checkpoint,
    run_cli,
    sha,
    spec_of,
    write_config,
)

from export_lib.results import write_json
from export_lib.storage.aliases import resolve_alias, set_alias
from export_lib.storage.checkpoints import discover
from export_lib.storage.s3 import StorageAccessError, make_client
from export_lib.storage.store import Store, checkpoint_digest, list_incomplete, list_versions, version_id
from export_lib.storage.sync import checkpoint_sources, fetch_all

MB = 1024 * 1024
STORE = Store(EXPORTS, "exports")


@pytest.fixture
def s3(s3_client):
    make_buckets(s3_client)
    return s3_client


def _first_k(k: int, status: int, code: str, methods=("GET", "PUT", "HEAD", "POST", "DELETE")):
    def rule(method, path, headers, nth):
        return (status, code) if method in methods and nth <= k else None
    return rule


# Throttling backs off from 1 s (botocore standard mode), transient 5xx from 50 ms: fewer faults for SlowDown.
@pytest.mark.parametrize(("status", "code", "k"), [(503, "SlowDown", 1), (500, "InternalError", 2)])
def test_throttling_and_5xx_are_retried_for_sync_and_publish(s3, s3_endpoint, tmp_path, status, code, k):
    data = os.urandom(12 * MB)
    put_checkpoint(s3, "step-1", {"model.safetensors": data, "config.json": b"{}"})
    spec = spec_of(write_config(tmp_path))
    with FaultProxy(s3_endpoint, _first_k(k, status, code)) as proxy:
        client = make_client(endpoint_url=proxy.url, max_attempts=5)
        ckpt = discover(client, spec.checkpoint)
        synced = fetch_all(client, checkpoint_sources(ckpt, spec.checkpoint), tmp_path / "cache")
        assert {s.name: s.sha256 for s in synced}["model.safetensors"] == sha(data)

        workdir = tmp_path / "wd"
        fake_export_outputs(workdir)
        from export_lib.storage.store import build_manifest, collect_files, publish

        variants, reports = collect_files(workdir, spec.variants)
        sync = {"checkpoint_uri": ckpt.uri, "checkpoint_digest": "c" * 64, "config_digest": "d" * 64}
        manifest = build_manifest(model="digits", version="v1", sync=sync, spec_json={}, workdir=workdir,
                                  variants=variants, reports=reports)
        files = [*(f for fs in variants.values() for f in fs), *reports]
        result = publish(client, STORE, "digits", "v1", files, manifest)
        assert not result["already_published"]
        set_alias(client, STORE, "digits", "staging", "v1", actor="t")
    assert proxy.faults[code] >= 10 * k  # every path failed k times at first, and everything still succeeded
    assert [v["version"] for v in list_versions(s3, STORE, "digits")] == ["v1"]
    assert resolve_alias(s3, STORE, "digits", "staging")["version"] == "v1"


def test_permanent_403_names_the_key_and_the_fix(s3, s3_endpoint, tmp_path):
    put_checkpoint(s3, "step-1", {"model.safetensors": b"secret"})
    spec = spec_of(write_config(tmp_path))

    def deny_weights(method, path, headers, nth):
        return (403, "AccessDenied") if path.endswith("/model.safetensors") else None

    with FaultProxy(s3_endpoint, deny_weights) as proxy:
        client = make_client(endpoint_url=proxy.url, max_attempts=3)
        ckpt = discover(client, spec.checkpoint)
        started = time.monotonic()
        with pytest.raises(StorageAccessError) as e:
            fetch_all(client, checkpoint_sources(ckpt, spec.checkpoint), tmp_path / "cache")
    msg = str(e.value)
    assert f"s3://{TRAIN}/digits/step-1/model.safetensors" in msg and "denied" in msg
    assert "s3:GetObject" in msg and "IRSA" in msg
    assert time.monotonic() - started < 5  # a 403 is not retried
    assert not list((tmp_path / "cache").rglob("model.safetensors"))

    def deny_all(method, path, headers, nth):
        return 403, "AccessDenied"

    with FaultProxy(s3_endpoint, deny_all) as proxy, pytest.raises(StorageAccessError) as e:
        discover(make_client(endpoint_url=proxy.url, max_attempts=2), spec.checkpoint)
    assert f"listing s3://{TRAIN}/digits/" in str(e.value)


def test_store_without_conditional_writes_degrades_and_says_so(s3, s3_endpoint, tmp_path, caplog):
    def no_conditionals(method, path, headers, nth):
        lowered = {k.lower() for k in headers}
        if method == "PUT" and ({"if-none-match", "if-match"} & lowered):
            return 501, "NotImplemented"
        return None

    workdir = tmp_path / "wd"
    fake_export_outputs(workdir)
    from export_lib.storage.store import build_manifest, collect_files, publish

    variants, reports = collect_files(workdir, ["onnx-fp32", "onnx-int8"])
    sync = {"checkpoint_uri": "s3://x/y/", "checkpoint_digest": "c" * 64, "config_digest": "d" * 64}
    manifest = build_manifest(model="digits", version="v1", sync=sync, spec_json={}, workdir=workdir,
                              variants=variants, reports=reports)
    files = [*(f for fs in variants.values() for f in fs), *reports]
    caplog.set_level(logging.WARNING)
    with FaultProxy(s3_endpoint, no_conditionals) as proxy:
        client = make_client(endpoint_url=proxy.url, max_attempts=2)
        assert not publish(client, STORE, "digits", "v1", files, manifest)["already_published"]
        assert publish(client, STORE, "digits", "v1", files, manifest)["already_published"]
        set_alias(client, STORE, "digits", "staging", "v1", actor="t")
    assert proxy.faults["NotImplemented"] >= 2
    assert any("rejected a conditional write (NotImplemented)" in r.getMessage() and "head-then-put" in r.getMessage()
               for r in caplog.records)
    assert [v["version"] for v in list_versions(s3, STORE, "digits")] == ["v1"]
    assert resolve_alias(s3, STORE, "digits", "staging")["version"] == "v1"


def test_publisher_killed_between_uploads_leaves_no_manifest_and_rerun_completes(s3, s3_endpoint, tmp_path):
    config = write_config(tmp_path)
    spec = spec_of(config)
    ck = checkpoint_digest([("model.safetensors", sha(b"w"))])
    version = version_id(ck, spec.digest())
    workdir = tmp_path / "ws" / "digits" / version
    fake_export_outputs(workdir)
    write_json(workdir / "results" / "sync.json", {
        "workdir": str(workdir), "version": version, "checkpoint_uri": f"s3://{TRAIN}/digits/step-1/",
        "checkpoint_step": 1, "checkpoint_digest": ck, "config_digest": spec.digest(),
        "checkpoint_files": [{"name": "model.safetensors", "sha256": sha(b"w"), "size": 1}]})

    second_put = threading.Event()
    release = threading.Event()
    puts: list[str] = []

    def stall_second_upload(method, path):
        if method != "PUT" or "/manifest.json" in path:
            return None
        puts.append(path)
        if len(puts) >= 2:
            second_put.set()
            release.wait(60)
            return False  # the publisher is dead by now: never store this upload
        return None

    with FaultProxy(s3_endpoint, lambda *a: None, on_request=stall_second_upload) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url,
               "PYTHONPATH": os.pathsep.join([str(REPO / "include"), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-m", "export_lib", "publish", "--config", str(config),
                                 "--model", "digits", "--workdir", str(workdir)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert second_put.wait(60), "the publisher never reached its second upload"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            release.set()
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGKILL

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=EXPORTS, Prefix=f"exports/digits/{version}/")["Contents"]]
    assert len(keys) == 1 and keys[0].endswith("onnx-fp32/model.onnx")  # exactly the first upload landed
    assert list_versions(s3, STORE, "digits") == []  # invisible: no manifest
    assert [v["version"] for v in list_incomplete(s3, STORE, "digits")] == [version]
    versions = run_cli("versions", "--config", str(config), "--model", "digits", "--result-file",
                       str(tmp_path / "v.json"))
    assert versions.returncode == 0 and '"versions": []' in versions.stdout

    rerun = run_cli("publish", "--config", str(config), "--model", "digits", "--workdir", str(workdir))
    assert rerun.returncode == 0, rerun.stderr
    import json

    result = json.loads((workdir / "results" / "publish.json").read_text())
    assert result["already_published"] is False and result["reused_files"] == 1
    assert [v["version"] for v in list_versions(s3, STORE, "digits")] == [version]
    assert list_incomplete(s3, STORE, "digits") == []
