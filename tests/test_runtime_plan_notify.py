"""Runtime/config resolution, the run plan from the trigger conf, and the failure notifier."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from export_lib.config import ConfigError


# ------------------------------------------------------------------------------------------------ runtime
def test_runtime_variable_wins_over_environment(airflow_home, monkeypatch):
    from operators.runtime import resolve_runtime

    monkeypatch.delenv("AIRFLOW_VAR_EXPORT_RUNTIME", raising=False)
    monkeypatch.delenv("EXPORT_RUNTIME", raising=False)
    assert resolve_runtime() == "local"
    monkeypatch.setenv("EXPORT_RUNTIME", "kubernetes")
    assert resolve_runtime() == "kubernetes"
    monkeypatch.setenv("AIRFLOW_VAR_EXPORT_RUNTIME", "local")  # the Variable, from the env secrets backend
    assert resolve_runtime() == "local"
    monkeypatch.setenv("AIRFLOW_VAR_EXPORT_RUNTIME", "docker")
    with pytest.raises(ConfigError, match="export_runtime"):
        resolve_runtime()


def test_config_path_resolution(airflow_home, monkeypatch, tmp_path):
    from operators.paths import DEFAULT_CONFIG_PATH, REPO_ROOT
    from operators.runtime import load_export_config, resolve_config_path

    monkeypatch.delenv("AIRFLOW_VAR_EXPORT_CONFIG", raising=False)
    monkeypatch.delenv("EXPORT_CONFIG", raising=False)
    assert resolve_config_path() == DEFAULT_CONFIG_PATH
    monkeypatch.setenv("EXPORT_CONFIG", "include/config/export.yaml")
    assert resolve_config_path() == REPO_ROOT / "include" / "config" / "export.yaml"
    monkeypatch.setenv("AIRFLOW_VAR_EXPORT_CONFIG", str(tmp_path / "missing.yaml"))
    assert resolve_config_path() == tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_export_config()


# --------------------------------------------------------------------------------------------------- plan
@pytest.fixture(scope="module")
def config():
    from operators.paths import DEFAULT_CONFIG_PATH
    from operators.runtime import load_export_config

    return load_export_config(DEFAULT_CONFIG_PATH)


def test_plan_defaults_to_every_configured_model(config):
    from operators.pipeline import plan_runs

    runs = plan_runs(config, {"models": [], "force": False, "variants": [], "checkpoint_uri": None})
    assert [r["model"] for r in runs] == [m.name for m in config.models]
    assert all(r == {"model": r["model"], "variants": "", "checkpoint_uri": None, "force": False} for r in runs)


def test_plan_keeps_only_each_models_requested_variants(config):
    from operators.pipeline import plan_runs

    runs = plan_runs(config, {"models": ["digits-cnn"], "variants": ["onnx-fp32", "tensorrt-fp16"], "force": True})
    assert runs == [{"model": "digits-cnn", "variants": "onnx-fp32", "checkpoint_uri": None, "force": True}]


def test_plan_restricts_to_fp32_when_a_model_has_none_of_the_requested_variants(config):
    """`variants: [tensorrt-fp16]` for models without TensorRT builds onnx-fp32 only, not every configured variant."""
    from operators.pipeline import plan_runs

    runs = plan_runs(config, {"models": [], "variants": ["tensorrt-fp16"], "force": False, "checkpoint_uri": None})
    assert {r["variants"] for r in runs} == {"onnx-fp32"}


def test_a_misspelt_conf_key_reaches_plan_through_airflows_params(airflow_home, config):
    """Airflow's trigger validation accepts unknown conf keys (they are merged into params): plan must see them."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import AirflowFailException
    from airflow.serialization.serialized_objects import DagSerialization

    from operators.paths import REPO_ROOT
    from operators.pipeline import plan_runs

    dag = DagBag(dag_folder=str(REPO_ROOT / "dags" / "model_export_nightly.py")).dags["model_export_nightly"]
    params = DagSerialization.from_dict(DagSerialization.to_dict(dag)).params.deep_merge({"modles": ["x"]})
    params.validate()  # what the API does on trigger: no error
    with pytest.raises(AirflowFailException, match="modles"):
        plan_runs(config, {k: params[k] for k in params})


@pytest.mark.parametrize(("params", "message"), [
    ({"models": ["nope"]}, "not in the export config"),
    ({"models": [], "checkpoint_uri": "s3://train-bucket/digits-cnn/000100/"}, "exactly one model"),
    ({"models": ["digits-cnn"], "variants": ["onnx-fp64"]}, "unknown variants"),
    ({"modles": ["digits-cnn"]}, r"unknown trigger conf keys \['modles'\]"),  # a typo must not export all
])
def test_plan_rejects_a_bad_conf(config, params, message):
    from airflow.sdk.exceptions import AirflowFailException

    from operators.pipeline import plan_runs

    with pytest.raises(AirflowFailException, match=message):
        plan_runs(config, params)


def test_trigger_form_lists_the_configured_models(config):
    from operators.pipeline import trigger_params

    params = trigger_params(config)
    names = [m.name for m in config.models]
    assert params["models"].value == names
    assert params["models"].schema["items"]["enum"] == names and params["models"].schema["type"] == "array"
    assert params["force"].schema["type"] == "boolean"
    assert params["checkpoint_uri"].schema["type"] == ["null", "string"]


@pytest.mark.parametrize(("value", "ok"), [
    (None, True), ("", True), ("s3://train-bucket/digits-cnn/000100/", True), ("/mnt/ckpt/000100", True),
    ("train-bucket/digits-cnn/", False), ("s3://Bad_Bucket/x/", False),
])
def test_checkpoint_uri_form_accepts_cleared_field_and_rejects_malformed(config, value, ok):
    """The UI may send "" for a cleared field: it means "newest", like null; malformed URIs are refused."""
    from airflow.sdk import ParamsDict

    from operators.pipeline import trigger_params

    params = ParamsDict(trigger_params(config))
    if ok:
        params["checkpoint_uri"] = value
        params.validate()
    else:
        with pytest.raises(ValueError, match="checkpoint_uri"):
            params["checkpoint_uri"] = value


# ------------------------------------------------------------------------------------------------ notifier
class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def _context():
    ti = SimpleNamespace(task_id="export_model.convert", dag_id="model_export_nightly", run_id="manual__1",
                         map_index=2, try_number=3)
    task = SimpleNamespace(model="digits-cnn", step="convert")
    return {"ti": ti, "task": task, "exception": RuntimeError("exit code 2 (bad input): truncated checkpoint")}


def test_failure_notifier_names_model_step_and_reason_and_posts_to_the_webhook(airflow_home, monkeypatch):
    from operators.notify import ExportFailureNotifier, failure_message

    message = failure_message(_context())
    assert "model 'digits-cnn' step 'convert'" in message and "truncated checkpoint" in message
    assert "map index 2, try 3" in message

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("EXPORT_ALERT_WEBHOOK", f"http://127.0.0.1:{server.server_port}/hook")
        ExportFailureNotifier().notify(_context())
    finally:
        server.shutdown()
    assert _Hook.received == [{"text": message}]


def test_an_unreachable_webhook_never_raises(airflow_home, monkeypatch):
    from conftest import free_port

    from operators.notify import ExportFailureNotifier

    ExportFailureNotifier(webhook_url=f"http://127.0.0.1:{free_port()}/hook", timeout_s=2).notify(_context())


def test_docs_name_every_module():
    text = (Path(__file__).resolve().parents[1] / "docs" / "operators.md").read_text()
    for module in ("paths.py", "runtime.py", "export_step.py", "export_pod.py", "pipeline.py", "notify.py"):
        assert f"`{module}`" in text


def test_a_bad_conf_fails_plan_and_summary_once_without_retries(airflow_home, monkeypatch):
    """dag.test with a misspelt conf key: `plan` fails naming it, nothing is exported, `summary` fails at once
    with a clear message (not a TypeError on the missing plan, retried twice with backoff)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from operators.paths import DEFAULT_CONFIG_PATH, REPO_ROOT

    monkeypatch.setenv("EXPORT_CONFIG", str(DEFAULT_CONFIG_PATH))
    monkeypatch.setenv("EXPORT_RUNTIME", "local")
    dag = DagBag(dag_folder=str(REPO_ROOT / "dags" / "model_export_nightly.py")).dags["model_export_nightly"]
    run = dag.test(run_conf={"modles": ["digits-cnn"]})
    assert run.state == "failed"
    with create_session() as session:
        tis = {ti.task_id: ti for ti in session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dag.dag_id, TaskInstance.run_id == run.run_id))}
        assert (tis["plan"].state, tis["plan"].try_number) == ("failed", 1)
        assert tis["export_model.sync"].state == "upstream_failed"
        assert (tis["summary"].state, tis["summary"].try_number) == ("failed", 1)
