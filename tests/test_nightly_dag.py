"""`model_export_nightly` end to end with dag.test(): the local runtime, moto S3 over HTTP, two real models.

One run exports a CNN (trained on the digits, real accuracy) and a transformer encoder, while a third model with a
truncated checkpoint fails on its own; a rerun of the two good models is a no-op.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

DAG_ID = "model_export_nightly"
EXPORTS = "model-exports"
GOOD = ("digits-cnn", "tiny-encoder")
BROKEN = "broken-cnn"
QUICK_BENCH = {"batch_sizes": [2], "warmup": 1, "window": 5, "max_windows": 3}
ENCODER_KW = {"vocab": 64, "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "max_len": 16}


def config(workspace: Path) -> dict:
    digits = {
        "name": "digits-cnn", "factory": "model_zoo.digits:DigitsCNN",
        "checkpoint": {"uri": "s3://train-bucket/digits-cnn/"},
        "inputs": [{"name": "pixels", "shape": ["batch", 1, 8, 8],
                    "dynamic": {"batch": {"min": 1, "opt": 2, "max": 8}}}],
        "outputs": ["logits"],
        "tolerances": {"onnx-int8": {"atol": 1.5, "rtol": 0.3, "max_mismatch_fraction": 0.2}},
        "accuracy": {"metric": "top1_accuracy", "threshold": 0.8,
                     "eval_data": "s3://train-bucket/datasets/digits/eval.npz", "max_samples": 64},
        "calibration": {"data": "s3://train-bucket/datasets/digits/calib.npz", "samples": 32},
        "validation": {"samples": 4},
        "benchmark": QUICK_BENCH,
    }
    dyn = {"batch": {"min": 1, "opt": 2, "max": 4}, "seq": {"min": 4, "opt": 8, "max": 16}}
    encoder = {
        "name": "tiny-encoder", "factory": "model_zoo.encoder:TinyEncoder", "factory_kwargs": ENCODER_KW,
        "checkpoint": {"uri": "s3://train-bucket/tiny-encoder/"},
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"], "dynamic": dyn,
             "sample": {"kind": "randint", "low": 0, "high": ENCODER_KW["vocab"]}},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"], "dynamic": dyn,
             "sample": {"kind": "ones"}},
        ],
        "outputs": ["logits"],
        "tolerances": {"onnx-int8": {"atol": 1.0, "rtol": 0.5, "max_mismatch_fraction": 0.5}},
        "accuracy": {"metric": "top1_agreement", "threshold": 0.5},
        "calibration": {"samples": 8},
        "validation": {"samples": 4},
        "benchmark": QUICK_BENCH,
    }
    broken = {**digits, "name": BROKEN, "checkpoint": {"uri": "s3://train-bucket/broken-cnn/"}}
    return {"pipeline": {"export_bucket": EXPORTS, "export_prefix": "exports", "workspace": str(workspace)},
            "models": [digits, encoder, broken]}


@pytest.fixture
def nightly(airflow_home, s3_client, tmp_path, monkeypatch):
    """Training outputs in S3, the config in EXPORT_CONFIG, the GPU pool; returns a `run(conf)` helper."""
    from airflow.models.pool import Pool

    from export_lib.config import parse_config
    from scripts.seeding import digits_files, encoder_checkpoint, put_checkpoint, put_uri

    cfg = config(tmp_path / "workspace")
    path = tmp_path / "export.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("EXPORT_CONFIG", str(path))
    monkeypatch.setenv("EXPORT_RUNTIME", "local")
    pipeline = parse_config(cfg).pipeline
    Pool.create_or_update_pool(name=pipeline.gpu_pool, slots=pipeline.gpu_pool_slots, description="GPU steps",
                               include_deferred=False)

    digits = digits_files(epochs=3)
    s3_client.create_bucket(Bucket=EXPORTS)
    put_uri(s3_client, "s3://train-bucket/datasets/digits/eval.npz", digits["eval"])
    put_uri(s3_client, "s3://train-bucket/datasets/digits/calib.npz", digits["calib"])
    put_checkpoint(s3_client, "s3://train-bucket/digits-cnn/", 100, {"model.safetensors": digits["checkpoint"]})
    put_checkpoint(s3_client, "s3://train-bucket/tiny-encoder/", 7,
                   {"model.safetensors": encoder_checkpoint(**ENCODER_KW)})
    put_checkpoint(s3_client, "s3://train-bucket/broken-cnn/", 100,
                   {"model.safetensors": digits["checkpoint"][: len(digits["checkpoint"]) // 2]})

    def run(conf: dict | None = None):
        from airflow.dag_processing.dagbag import DagBag

        from operators.paths import REPO_ROOT

        bag = DagBag(dag_folder=str(REPO_ROOT / "dags" / f"{DAG_ID}.py"))
        assert not bag.import_errors, bag.import_errors
        dag = bag.dags[DAG_ID]
        assert [m["name"] for m in cfg["models"]] == dag.params["models"]  # the form lists the config's models
        return dag.test(run_conf=conf or {})

    return run


def states(run_id: str) -> dict[tuple[str, str], str]:
    """(task_id, model) -> state; the model is the map index label that sync (which always runs) rendered."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == DAG_ID,
                                                         TaskInstance.run_id == run_id)).all()
        model_of = {ti.map_index: ti.rendered_map_index for ti in tis if ti.task_id == "export_model.sync"}
        return {(ti.task_id.removeprefix("export_model."), model_of.get(ti.map_index, str(ti.map_index))): ti.state
                for ti in tis}


def summary_report(run_id: str) -> dict[str, dict]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(select(XComModel).where(XComModel.dag_id == DAG_ID, XComModel.run_id == run_id,
                                                       XComModel.task_id == "summary")).all()
        report = next(XComModel.deserialize_value(r) for r in rows if r.key in ("return_value", "report"))
    return {e["model"]: e for e in report}


def export_objects(s3_client) -> dict[str, str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=EXPORTS)
    return {o["Key"]: o["ETag"] for p in pages for o in p.get("Contents", [])}


def test_nightly_exports_two_models_isolates_a_broken_one_and_reruns_as_a_no_op(nightly, s3_client):
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    first = nightly()
    assert first.state == "failed"  # one model failed: the run says so (CI, alerts) ...
    st = states(first.run_id)
    for model in GOOD:  # ... but the good models went all the way
        for step in ("sync", "needs_export", "convert", "calibrate", "validate", "benchmark", "select", "publish",
                     "hand_over"):
            assert st[step, model] == "success", (step, model, st[step, model])
    assert st["sync", BROKEN] == "success"
    assert st["convert", BROKEN] == "failed"
    assert {st[s, BROKEN] for s in ("calibrate", "validate", "benchmark", "select", "publish", "hand_over")} \
        == {"upstream_failed"}
    report = summary_report(first.run_id)
    assert report[BROKEN]["outcome"] == "failed" and report[BROKEN]["failed_step"] == "convert"
    assert "exit code 2 (bad input)" in report[BROKEN]["reason"] or "checkpoint" in report[BROKEN]["reason"]

    objects = export_objects(s3_client)
    assert not any(k.startswith(f"exports/{BROKEN}/") for k in objects)  # nothing half-published
    for model in GOOD:
        entry = report[model]
        assert entry["outcome"] == "published"
        key = f"exports/{model}/{entry['version']}/manifest.json"
        assert entry["manifest_uri"] == f"s3://{EXPORTS}/{key}"
        manifest = json.loads(s3_client.get_object(Bucket=EXPORTS, Key=key)["Body"].read())
        assert manifest["model"] == model and manifest["version"] == entry["version"]
        assert set(manifest["variants"]) == {"onnx-fp32", "onnx-int8"}
        assert manifest["selected_variant"] in manifest["variants"]
        assert manifest["validation"]["passed"] is True
        assert manifest["benchmark"]["settings"]["batch_sizes"] == [2]
        for info in manifest["variants"].values():  # every listed artifact is really there, same size
            for f in info["files"]:  # names are relative to the version prefix
                head = s3_client.head_object(Bucket=EXPORTS, Key=f"exports/{model}/{entry['version']}/{f['name']}")
                assert head["ContentLength"] == f["size"] > 0
    digits_acc = json.loads(s3_client.get_object(
        Bucket=EXPORTS, Key=f"exports/digits-cnn/{report['digits-cnn']['version']}/manifest.json")["Body"].read()
    )["validation"]["accuracy"]["values"]
    assert digits_acc["onnx-fp32"] >= 0.8  # a real model, really trained

    with create_session() as session:  # the hand-over to staging: one asset event per published model
        events = session.scalars(select(AssetEvent).where(AssetEvent.source_run_id == first.run_id)).all()
        extras = {e.extra["model"]: e.extra for e in events}
    assert set(extras) == set(GOOD)
    for model in GOOD:
        assert extras[model]["version"] == report[model]["version"]
        assert extras[model]["manifest_uri"] == report[model]["manifest_uri"]

    second = nightly({"models": list(GOOD)})
    assert second.state == "success"
    st = states(second.run_id)
    for model in GOOD:
        assert st["sync", model] == "success"
        assert st["needs_export", model] == "skipped"
        assert {st[s, model] for s in ("convert", "calibrate", "validate", "benchmark", "select", "publish",
                                       "hand_over")} == {"skipped"}
    assert {e["outcome"] for e in summary_report(second.run_id).values()} == {"up to date (nothing new)"}
    assert export_objects(s3_client) == objects  # the rerun wrote nothing
