"""The CI entry point: scripts/trigger_export.py against a real `airflow standalone` (REST API v2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TRIGGER = REPO / "scripts" / "trigger_export.py"
DAG_ID = "model_export_nightly"
EXPORTS = "model-exports"


def trigger(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRIGGER), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


# -------------------------------------------------------------------------------------------- usage (fast)
@pytest.mark.parametrize("args", [
    [],  # no URL
    ["--url", "http://127.0.0.1:9"],  # no credentials
    ["--url", "http://127.0.0.1:9", "--token", "t", "--model", "a", "--model", "b",
     "--checkpoint-uri", "s3://b/a/1/"],  # a pinned checkpoint needs exactly one model
])
def test_bad_usage_exits_2(args, monkeypatch):
    for k in ("AIRFLOW_URL", "AIRFLOW_TOKEN", "AIRFLOW_USERNAME", "AIRFLOW_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    assert trigger(*args, timeout=60).returncode == 2


def test_unreachable_api_exits_2():
    from conftest import free_port

    out = trigger("--url", f"http://127.0.0.1:{free_port()}", "--username", "u", "--password", "p", timeout=60)
    assert out.returncode == 2 and "cannot reach the Airflow API" in out.stderr


# ------------------------------------------------------------------------------------- standalone (slow)
def _get(url: str, token: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}
    except (urllib.error.URLError, OSError):
        return 0, {}


@pytest.fixture
def standalone(s3_client, tmp_path):
    """`airflow standalone` in its own home and process group, with the export config of this test."""
    from conftest import free_port

    from scripts.seeding import digits_files, put_checkpoint, put_uri

    digits = digits_files(epochs=2)
    s3_client.create_bucket(Bucket=EXPORTS)
    put_uri(s3_client, "s3://train-bucket/datasets/digits/eval.npz", digits["eval"])
    folder = put_checkpoint(s3_client, "s3://train-bucket/digits-cnn/", 100,
                            {"model.safetensors": digits["checkpoint"]})
    quick = {"batch_sizes": [2], "warmup": 1, "window": 5, "max_windows": 3}
    model = {
        "name": "digits-cnn", "factory": "model_zoo.digits:DigitsCNN",
        "checkpoint": {"uri": "s3://train-bucket/digits-cnn/"},
        "inputs": [{"name": "pixels", "shape": ["batch", 1, 8, 8],
                    "dynamic": {"batch": {"min": 1, "opt": 2, "max": 8}}}],
        "outputs": ["logits"], "variants": ["onnx-fp32"],
        "accuracy": {"metric": "top1_accuracy", "threshold": 0.5,
                     "eval_data": "s3://train-bucket/datasets/digits/eval.npz", "max_samples": 32},
        "validation": {"samples": 4}, "benchmark": quick,
    }
    # A second configured model without any checkpoint: the CI conf selects only the first.
    other = {**model, "name": "other-cnn", "checkpoint": {"uri": "s3://train-bucket/other-cnn/"}}
    config = tmp_path / "export.yaml"
    config.write_text(yaml.safe_dump({"pipeline": {"export_bucket": EXPORTS, "workspace": str(tmp_path / "ws")},
                                      "models": [model, other]}))

    home, port = tmp_path / "airflow", free_port()
    home.mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "ci:admin",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "EXPORT_CONFIG": str(config),
        "EXPORT_RUNTIME": "local",
    }
    log_path = tmp_path / "standalone.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["airflow", "standalone"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while _get(f"{url}/api/v2/monitor/health")[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"airflow standalone did not become healthy:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["ci"]
        yield {"url": url, "password": password, "checkpoint": folder, "log": log_path, "env": env}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the scheduler, API server, DAG processor and triggerer too
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for_dag_and_pool(server: dict) -> None:
    """The DAG parsed and the GPU pool created, through the same REST API and client CI uses."""
    from airflow_client.client import ApiClient, Configuration
    from airflow_client.client.api.pool_api import PoolApi
    from airflow_client.client.models.pool_body import PoolBody

    from scripts.trigger_export import fetch_token

    token = fetch_token(server["url"], "ci", server["password"])
    deadline = time.monotonic() + 120
    while _get(f"{server['url']}/api/v2/dags/{DAG_ID}", token)[0] != 200:
        if time.monotonic() > deadline:
            pytest.fail(f"{DAG_ID} never appeared:\n{server['log'].read_text()[-4000:]}")
        time.sleep(2)
    with ApiClient(Configuration(host=server["url"], access_token=token)) as api:
        PoolApi(api).post_pool(PoolBody(name="gpu", slots=2, description="GPU export steps"))


@pytest.mark.slow
def test_ci_trigger_against_a_real_standalone(standalone, s3_client):
    _wait_for_dag_and_pool(standalone)
    creds = ["--url", standalone["url"], "--username", "ci", "--password", standalone["password"], "--poll", "2"]

    # A pinned checkpoint that does not exist: the run fails and the script exits 1, naming the step.
    bad = trigger(*creds, "--model", "digits-cnn", "--checkpoint-uri", "s3://train-bucket/digits-cnn/999999/",
                  "--timeout", "300")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "failed" in bad.stdout and "sync" in bad.stdout

    good = trigger(*creds, "--model", "digits-cnn", "--checkpoint-uri", standalone["checkpoint"],
                   "--timeout", "540")
    assert good.returncode == 0, good.stdout + good.stderr + standalone["log"].read_text()[-3000:]
    assert "run state: success" in good.stdout
    assert "export_model.publish[digits-cnn]" in good.stdout and "published" in good.stdout
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=EXPORTS, Prefix="exports/").get("Contents", [])]
    assert any(k.startswith("exports/digits-cnn/") and k.endswith("/manifest.json") for k in keys)
    assert not any(k.startswith("exports/other-cnn/") for k in keys)  # conf picked one model
