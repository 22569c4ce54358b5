"""The versioned artifact store and retention, against a moto server over HTTP."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from storage_helpers import EXPORTS, FaultProxy, fake_export_outputs, make_buckets, sha

from export_lib.results import BadInputError
from export_lib.storage.aliases import set_alias
from export_lib.storage.gc import collect, plan
from export_lib.storage.s3 import make_client
from export_lib.storage.store import (
    Store,
    build_manifest,
    checkpoint_digest,
    collect_files,
    get_manifest,
    list_incomplete,
    list_versions,
    manifest_exists,
    publish,
    version_id,
)

STORE = Store(EXPORTS, "exports")
VARIANTS = ["onnx-fp32", "onnx-int8"]


@pytest.fixture
def s3(s3_client):
    make_buckets(s3_client)
    return s3_client


def _sync(version_seed: str = "a") -> dict:
    files = [("model.safetensors", sha(version_seed.encode()))]
    ck = checkpoint_digest(files)
    cfg = sha(b"config")
    return {"checkpoint_uri": "s3://train-bucket/digits/step-1/", "checkpoint_step": 1, "checkpoint_digest": ck,
            "checkpoint_files": [{"name": n, "sha256": h, "size": 1} for n, h in files], "config_digest": cfg,
            "version": version_id(ck, cfg)}


def _publish(s3, tmp_path, seed: str = "a"):
    sync = _sync(seed)
    workdir = tmp_path / seed
    fake_export_outputs(workdir, payload=seed.encode())
    variants, reports = collect_files(workdir, VARIANTS)
    manifest = build_manifest(model="digits", version=sync["version"], sync=sync, spec_json={"name": "digits"},
                              workdir=workdir, variants=variants, reports=reports)
    files = [*(f for fs in variants.values() for f in fs), *reports]
    return sync["version"], files, manifest, publish(s3, STORE, "digits", sync["version"], files, manifest)


def test_version_id_is_deterministic_and_input_sensitive():
    ck = checkpoint_digest([("b.bin", "2" * 64), ("a.bin", "1" * 64)])
    assert ck == checkpoint_digest([("a.bin", "1" * 64), ("b.bin", "2" * 64)])  # order-free
    assert len(version_id(ck, "c" * 64)) == 16
    assert version_id(ck, "c" * 64) == version_id(ck, "c" * 64)
    assert version_id(ck, "d" * 64) != version_id(ck, "c" * 64)
    assert checkpoint_digest([("a.bin", "1" * 64)]) != checkpoint_digest([("renamed.bin", "1" * 64)])


def test_publish_layout_manifest_and_rerun_noop(s3, tmp_path):
    version, files, manifest, result = _publish(s3, tmp_path)
    assert not result["already_published"] and result["uploaded_files"] == len(files) == 7
    prefix = f"exports/digits/{version}/"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=EXPORTS, Prefix=prefix)["Contents"])
    assert keys == sorted([prefix + "manifest.json", *(prefix + f.name for f in files)])
    head = s3.head_object(Bucket=EXPORTS, Key=prefix + "onnx-fp32/model.onnx.data")
    assert head["Metadata"]["sha256"] == sha(b"a" * 100)

    m = get_manifest(s3, STORE, "digits", version)
    assert m["version"] == version and m["model"] == "digits" and m["selected_variant"] == "onnx-int8"
    assert m["checkpoint"]["digest"] == _sync()["checkpoint_digest"]
    assert m["library_versions"]["torch"] == "2.13.0" and "boto3" in m["library_versions"]
    assert m["gx_result"] == {"success": True, "statistics": {"evaluated": 4}}
    assert m["validation"]["passed"] is True and m["benchmark"]["onnx-int8"]["p50_ms"] == 1.0
    assert {f["name"] for f in m["variants"]["onnx-fp32"]["files"]} == {"onnx-fp32/model.onnx",
                                                                        "onnx-fp32/model.onnx.data"}
    assert [v["version"] for v in list_versions(s3, STORE, "digits")] == [version]

    again = publish(s3, STORE, "digits", version, files, manifest)
    assert again["already_published"] and again["uploaded_bytes"] == 0 and again["uploaded_files"] == 0


def test_half_published_version_is_invisible_then_completed(s3, tmp_path):
    sync = _sync("h")
    workdir = tmp_path / "h"
    fake_export_outputs(workdir)
    variants, reports = collect_files(workdir, VARIANTS)
    files = [*(f for fs in variants.values() for f in fs), *reports]
    version = sync["version"]
    # a killed publisher: some files uploaded with their sha256, no manifest
    for f in files[:3]:
        s3.upload_file(str(f.path), EXPORTS, STORE.key("digits", version, f.name),
                       ExtraArgs={"Metadata": {"sha256": f.sha256}})
    assert list_versions(s3, STORE, "digits") == []
    assert not manifest_exists(s3, STORE, "digits", version)
    assert [v["version"] for v in list_incomplete(s3, STORE, "digits")] == [version]
    with pytest.raises(BadInputError, match="no published version"):
        get_manifest(s3, STORE, "digits", version)
    with pytest.raises(BadInputError, match="not published"):
        set_alias(s3, STORE, "digits", "staging", version, actor="t")

    manifest = build_manifest(model="digits", version=version, sync=sync, spec_json={}, workdir=workdir,
                              variants=variants, reports=reports)
    result = publish(s3, STORE, "digits", version, files, manifest)
    assert result["reused_files"] == 3 and result["uploaded_files"] == len(files) - 3
    assert [v["version"] for v in list_versions(s3, STORE, "digits")] == [version]
    assert list_incomplete(s3, STORE, "digits") == []


def test_concurrent_publisher_of_same_version_keeps_the_first_manifest(s3, s3_endpoint, tmp_path):
    version, files, manifest, _ = _publish(s3, tmp_path)
    first = get_manifest(s3, STORE, "digits", version)

    # A second publisher whose existence check ran before the first one's manifest landed: the proxy answers
    # its first HEAD of manifest.json with 404, so it uploads and then loses the If-None-Match race.
    def stale_head(method, path, headers, nth):
        return (404, "NoSuchKey") if method == "HEAD" and path.endswith("/manifest.json") and nth == 1 else None

    with FaultProxy(s3_endpoint, stale_head) as proxy:
        client = make_client(endpoint_url=proxy.url, max_attempts=2)
        late = publish(client, STORE, "digits", version, files, {**manifest, "created_at": "second"})
    assert late["already_published"] and late["reused_files"] == len(files)
    assert get_manifest(s3, STORE, "digits", version)["created_at"] == first["created_at"]


# ---------------------------------------------------------------------------------------------------- GC
def test_gc_plan_rule():
    now = datetime(2026, 1, 10, tzinfo=UTC)
    versions = [{"version": f"v{i}", "published_at": (now - timedelta(days=i)).isoformat()} for i in range(6)]
    kept, delete = plan(versions, {"production": "v5"}, keep=2, max_age_days=3.5, now=now)
    assert [k["version"] for k in kept] == ["v0", "v1", "v2", "v3", "v5"]
    assert {d["version"]: d["why"] for d in delete} == {"v4": "beyond the newest 2 and older than 3.5 days"}
    kept, delete = plan(versions, {}, keep=0, max_age_days=None, now=now)
    assert kept == [] and len(delete) == 6
    with pytest.raises(BadInputError):
        plan(versions, {}, keep=-1, max_age_days=None, now=now)


def test_gc_never_deletes_aliased_versions_and_deletes_manifest_first(s3, tmp_path):
    published = []  # oldest first; S3 LastModified has one-second resolution, so space the publishes
    for seed in "abcd":
        published.append(_publish(s3, tmp_path, seed)[0])
        time.sleep(1.05)
    set_alias(s3, STORE, "digits", "production", published[0], actor="t", reason="oldest in prod")
    dry = collect(s3, STORE, "digits", keep=1)
    assert dry["dry_run"] and {d["version"] for d in dry["delete"]} == {published[1], published[2]}
    assert len(list_versions(s3, STORE, "digits")) == 4  # dry run deletes nothing

    done = collect(s3, STORE, "digits", keep=1, apply=True)
    assert set(done["deleted"]) == {published[1], published[2]}
    left = {v["version"] for v in list_versions(s3, STORE, "digits")}
    assert left == {published[0], published[3]}
    for v in (published[1], published[2]):
        assert s3.list_objects_v2(Bucket=EXPORTS, Prefix=STORE.version_prefix("digits", v))["KeyCount"] == 0
    assert any(k["version"] == published[0] and k["why"] == "alias production" for k in done["kept"])


def test_gc_removes_stale_incomplete_versions_only_after_grace(s3, tmp_path):
    s3.put_object(Bucket=EXPORTS, Key="exports/digits/deadbeefdeadbeef/onnx-fp32/model.onnx", Body=b"x")
    assert collect(s3, STORE, "digits", keep=5)["delete"] == []
    later = datetime.now(UTC) + timedelta(hours=25)
    result = collect(s3, STORE, "digits", keep=5, apply=True, now=later)
    assert result["deleted"] == ["deadbeefdeadbeef"]
    assert s3.list_objects_v2(Bucket=EXPORTS, Prefix="exports/digits/deadbeef")["KeyCount"] == 0
