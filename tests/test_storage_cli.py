"""The storage commands through `python -m export_lib ...` in a subprocess, against moto over HTTP."""

from __future__ import annotations

import json
import os

import pytest
from storage_helpers import EXPORTS, TRAIN, fake_export_outputs, make_buckets, put_checkpoint, run_cli, write_config

from export_lib.storage.store import Store, list_versions


@pytest.fixture
def s3(s3_client):
    make_buckets(s3_client)
    return s3_client


def _result(path):
    return json.loads(path.read_text())


def test_sync_publish_versions_alias_manifest_gc(s3, tmp_path):
    weights = os.urandom(2 * 1024 * 1024)
    put_checkpoint(s3, "step-100", {"model.safetensors": weights, "config.json": b"{}"}, sums=True)
    s3.put_object(Bucket=TRAIN, Key="data/digits-eval.npz", Body=b"npz-bytes")
    config = write_config(tmp_path, eval_data=f"s3://{TRAIN}/data/digits-eval.npz")
    ws = tmp_path / "ws"
    common = ["--config", str(config), "--model", "digits"]

    r = run_cli("sync", *common, "--workspace", str(ws), "--result-file", str(tmp_path / "sync.json"))
    assert r.returncode == 0, r.stderr
    sync = _result(tmp_path / "sync.json")
    workdir = ws / "digits" / sync["version"]
    assert sync["workdir"] == str(workdir) and len(sync["version"]) == 16
    assert sync["checkpoint_uri"] == f"s3://{TRAIN}/digits/step-100/" and sync["checkpoint_step"] == 100
    assert sync["published"] is False and sync["objects_downloaded"] == 3 and sync["objects_skipped"] == 0
    assert sync["checkpoint_verified"] == ["config.json", "model.safetensors"]
    assert (workdir / "checkpoint" / "model.safetensors").read_bytes() == weights
    assert (workdir / "data" / "digits-eval.npz").read_bytes() == b"npz-bytes"
    assert _result(workdir / "results" / "sync.json")["version"] == sync["version"]
    assert "selected checkpoint" in r.stderr and "% (" in r.stderr  # discovery and progress are logged

    # a rerun with the same checkpoint and config moves zero bytes and lands in the same workdir
    r = run_cli("sync", *common, "--workspace", str(ws), "--result-file", str(tmp_path / "sync2.json"))
    again = _result(tmp_path / "sync2.json")
    assert r.returncode == 0 and again["version"] == sync["version"]
    assert again["bytes_downloaded"] == 0 and again["objects_skipped"] == 3

    # a different variant set is a different spec, so a different version of the same checkpoint
    r = run_cli("sync", *common, "--variants", "onnx-fp32", "--workspace", str(ws),
                "--result-file", str(tmp_path / "sync3.json"))
    assert r.returncode == 0 and _result(tmp_path / "sync3.json")["version"] != sync["version"]
    assert _result(tmp_path / "sync3.json")["bytes_downloaded"] == 0  # same cache

    fake_export_outputs(workdir)
    r = run_cli("publish", *common, "--workdir", str(workdir))
    assert r.returncode == 0, r.stderr
    pub = _result(workdir / "results" / "publish.json")
    assert pub["already_published"] is False and pub["selected_variant"] == "onnx-int8" and pub["uploaded_bytes"] > 0
    assert pub["manifest_uri"] == f"s3://{EXPORTS}/exports/digits/{sync['version']}/manifest.json"
    r = run_cli("publish", *common, "--workdir", str(workdir))
    rerun = _result(workdir / "results" / "publish.json")
    assert r.returncode == 0 and rerun["already_published"] is True and rerun["uploaded_bytes"] == 0
    assert "already published" in r.stderr and "nothing to do" in r.stderr

    r = run_cli("sync", *common, "--workspace", str(ws), "--result-file", str(tmp_path / "sync4.json"))
    assert _result(tmp_path / "sync4.json")["published"] is True

    r = run_cli("versions", *common)
    assert r.returncode == 0 and [v["version"] for v in json.loads(r.stdout)["versions"]] == [sync["version"]]

    r = run_cli("alias", *common, "set", "--alias", "staging", "--version", sync["version"], "--reason", "nightly",
                "--actor", "ci", "--result-file", str(tmp_path / "alias.json"))
    assert r.returncode == 0, r.stderr
    assert _result(tmp_path / "alias.json")["changed"] is True
    r = run_cli("alias", *common, "get", "--alias", "staging")
    assert json.loads(r.stdout)["version"] == sync["version"]
    r = run_cli("alias", *common, "history")
    assert [(h["to"], h["actor"], h["reason"]) for h in json.loads(r.stdout)["history"]] == [
        (sync["version"], "ci", "nightly")]
    r = run_cli("manifest", *common, "--alias", "staging")
    manifest = json.loads(r.stdout)
    assert manifest["version"] == sync["version"] and manifest["checkpoint"]["digest"] == sync["checkpoint_digest"]
    assert manifest["config"]["name"] == "digits" and manifest["config_digest"] == sync["config_digest"]
    assert {d["name"] for d in manifest["data"]} == {"digits-eval.npz"}

    r = run_cli("gc", *common, "--keep", "0")
    plan = json.loads(r.stdout)
    assert r.returncode == 0 and plan["dry_run"] and plan["delete"] == []  # the only version is aliased
    assert plan["kept"] == [{"version": sync["version"], "why": "alias staging"}]


def test_bad_inputs_exit_2_with_clear_messages(s3, tmp_path):
    config = write_config(tmp_path)
    common = ["--config", str(config), "--model", "digits"]
    r = run_cli("sync", *common, "--workspace", str(tmp_path / "ws"))
    assert r.returncode == 2 and f"no complete checkpoint under s3://{TRAIN}/digits/" in r.stderr

    r = run_cli("sync", *common, "--checkpoint-uri", "train-bucket/digits/step-1/")
    assert r.returncode == 2 and "is not s3://... or an existing local directory" in r.stderr

    r = run_cli("publish", *common, "--workdir", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "run sync first" in r.stderr

    r = run_cli("manifest", *common, "--version", "0123456789abcdef")
    assert r.returncode == 2 and "no published version '0123456789abcdef'" in r.stderr

    r = run_cli("alias", *common, "set", "--alias", "production", "--version", "0123456789abcdef")
    assert r.returncode == 2 and "not published" in r.stderr

    r = run_cli("alias", *common, "set", "--alias", "staging")
    assert r.returncode == 2 and "needs --version" in r.stderr

    r = run_cli("gc", *common, "--keep", "-1")
    assert r.returncode == 2 and "--keep must be >= 0" in r.stderr

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = run_cli("sync", *common, "--workspace", str(blocker / "ws"))
    assert r.returncode == 2 and f"workspace '{blocker / 'ws'}' is not a writable directory" in r.stderr

    assert list_versions(s3, Store(EXPORTS, "exports"), "digits") == []


def test_publish_refuses_a_workdir_synced_with_another_spec(s3, tmp_path):
    put_checkpoint(s3, "step-1", {"model.safetensors": b"w"})
    config = write_config(tmp_path)
    common = ["--config", str(config), "--model", "digits"]
    r = run_cli("sync", *common, "--variants", "onnx-fp32", "--result-file", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    workdir = _result(tmp_path / "s.json")["workdir"]
    r = run_cli("publish", *common, "--workdir", workdir)  # without --variants: another spec
    assert r.returncode == 2 and "different model spec or --variants" in r.stderr


def test_storage_modules_are_light():
    """The Airflow scheduler image has no torch/onnx: storage and its commands must import without them."""
    code = ("import sys\n"
            "import export_lib.storage.aliases, export_lib.storage.gc, export_lib.storage.sync\n"
            "import export_lib.commands.sync, export_lib.commands.publish, export_lib.commands.alias\n"
            "import export_lib.commands.gc, export_lib.commands.manifest, export_lib.commands.versions\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime', 'airflow'))\n"
            "print(heavy)\n")
    import subprocess
    import sys

    from storage_helpers import REPO

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO / "include")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_failed_validation_is_never_selected_nor_published(s3, tmp_path):
    """Strict validation failed (exit 3) but someone runs the next steps by hand, or a selection.json from an
    earlier run is still there: select and publish refuse with exit 3 and nothing reaches the store."""
    put_checkpoint(s3, "step-100", {"model.safetensors": b"weights"})
    config = write_config(tmp_path)
    ws = tmp_path / "ws"
    common = ["--config", str(config), "--model", "digits"]
    r = run_cli("sync", *common, "--workspace", str(ws), "--result-file", str(tmp_path / "sync.json"))
    assert r.returncode == 0, r.stderr
    workdir = ws / "digits" / _result(tmp_path / "sync.json")["version"]
    fake_export_outputs(workdir, selected="onnx-fp32")  # selection.json of an earlier, passing run
    failure = "onnx-int8: top1_accuracy 0.9467 is below the threshold 0.9500"
    (workdir / "reports" / "validation.json").write_text(json.dumps({
        "passed": False, "failures": [failure],
        "variants": {"onnx-fp32": {"passed": True, "reasons": []},
                     "onnx-int8": {"passed": False, "reasons": [failure]}}}))
    (workdir / "reports" / "benchmark.json").write_text(json.dumps({"settings": {"batch_sizes": [1]}, "results": {}}))

    r = run_cli("select", *common, "--workdir", str(workdir))
    assert r.returncode == 3, r.stderr
    assert failure in r.stderr and "optional_variants" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((workdir / "reports" / "selection.json").read_text())["selected"] == "onnx-fp32"  # untouched

    r = run_cli("publish", *common, "--workdir", str(workdir))
    assert r.returncode == 3, r.stderr
    assert "never published" in r.stderr and failure in r.stderr
    assert s3.list_objects_v2(Bucket=EXPORTS).get("KeyCount", 0) == 0

    (workdir / "reports" / "validation.json").unlink()
    r = run_cli("publish", *common, "--workdir", str(workdir))
    assert r.returncode == 2 and "run `validate`" in r.stderr
    assert s3.list_objects_v2(Bucket=EXPORTS).get("KeyCount", 0) == 0


def test_steps_refuse_a_workdir_synced_with_another_spec(s3, tmp_path):
    """`validate --variants onnx-fp32` on the workdir sync made for [onnx-fp32, onnx-int8] used to overwrite that
    version's validation report with one that never looked at onnx-int8; every step now refuses (exit 2)."""
    put_checkpoint(s3, "step-100", {"model.safetensors": b"weights"})
    config = write_config(tmp_path)
    common = ["--config", str(config), "--model", "digits"]
    r = run_cli("sync", *common, "--workspace", str(tmp_path / "ws"), "--result-file", str(tmp_path / "sync.json"))
    assert r.returncode == 0, r.stderr
    workdir = tmp_path / "ws" / "digits" / _result(tmp_path / "sync.json")["version"]
    for step in ("convert", "calibrate", "validate", "benchmark", "select"):
        r = run_cli(step, *common, "--variants", "onnx-fp32", "--workdir", str(workdir))
        assert r.returncode == 2, (step, r.stderr)
        assert "was synced with a different model spec or --variants" in r.stderr and "Traceback" not in r.stderr
    assert not (workdir / "reports").exists() and not (workdir / "onnx-fp32").exists()
