"""The local runtime runs the real export CLI as a child process and returns its JSON result."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

MODEL = "digits-cnn"


class RecordingTI:
    """The one TaskInstance call the operator makes outside Airflow's runner: pushing the failure XCom."""

    def __init__(self):
        self.pushed: dict[str, object] = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value


@pytest.fixture
def config_path(tmp_path) -> Path:
    cfg = {
        "pipeline": {"export_bucket": "model-exports", "workspace": str(tmp_path / "ws")},
        "models": [{
            "name": MODEL, "factory": "model_zoo.digits:DigitsCNN",
            "checkpoint": {"uri": "s3://train-bucket/digits-cnn/"},
            "inputs": [{"name": "pixels", "shape": ["batch", 1, 8, 8],
                        "dynamic": {"batch": {"min": 1, "opt": 4, "max": 8}}}],
            "outputs": ["logits"],
        }],
    }
    path = tmp_path / "export.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_op(config_path: Path, step: str, **kwargs):
    from operators.export_step import LocalExportStepOperator
    from operators.runtime import load_export_config

    return LocalExportStepOperator(task_id=step, step=step, export_config=load_export_config(config_path),
                                   config_path=config_path, model=MODEL, **kwargs)


def test_sync_runs_the_cli_with_the_connection_and_returns_its_result(s3_client, config_path, monkeypatch):
    import torch
    from safetensors.torch import save

    from model_zoo.digits import DigitsCNN
    from scripts.seeding import put_checkpoint

    torch.manual_seed(0)
    body = save({k: v.contiguous() for k, v in DigitsCNN().state_dict().items()})
    folder = put_checkpoint(s3_client, "s3://train-bucket/digits-cnn/", 100, {"model.safetensors": body})
    s3_client.create_bucket(Bucket="model-exports")
    # The child must take endpoint and credentials from the Airflow connection, not the worker's environment.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")

    result = make_op(config_path, "sync").execute(context={"ti": RecordingTI()})

    assert result["step"] == "sync" and result["status"] == "ok"
    assert result["model"] == MODEL and result["checkpoint_uri"] == folder
    assert result["published"] is False
    workdir = Path(result["workdir"])
    assert workdir.parent.parent == config_path.parent / "ws"
    assert (workdir / "checkpoint" / "model.safetensors").read_bytes() == body


def test_child_env_takes_s3_from_the_connection_only(config_path, monkeypatch):
    """A connection to AWS itself (no endpoint_url): the worker's AWS_ENDPOINT_URL* must not reach the step."""
    import json

    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(
        {"conn_type": "aws", "login": "AKIACONN", "password": "conn-secret", "extra": {"region_name": "eu-west-1"}}))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.worker:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio.worker:9000")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "worker-token")
    env = make_op(config_path, "sync").child_env()
    assert "AWS_ENDPOINT_URL" not in env and "AWS_ENDPOINT_URL_S3" not in env
    assert "AWS_SESSION_TOKEN" not in env
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("AKIACONN", "conn-secret")
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1"


def test_a_failing_step_raises_naming_model_step_and_reason(s3_client, config_path):
    from airflow.sdk.exceptions import AirflowFailException

    s3_client.create_bucket(Bucket="train-bucket")  # no checkpoint under the model's prefix
    ti = RecordingTI()
    with pytest.raises(AirflowFailException) as err:
        make_op(config_path, "sync").execute(context={"ti": ti})
    message = str(err.value)
    assert f"model '{MODEL}'" in message and "step 'sync'" in message
    assert "exit code 2 (bad input)" in message
    assert "s3://train-bucket/digits-cnn/" in message  # the engine's message names what is missing
    failure = ti.pushed["failure"]
    assert failure["model"] == MODEL and failure["step"] == "sync" and failure["exit_code"] == 2


def test_an_internal_error_is_retryable(config_path, tmp_path):
    """Exit 1 (internal) may be transient: AirflowException (retried), not AirflowFailException."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    op = make_op(config_path, "convert", workdir=str(tmp_path / "missing"),
                 extra_args=["--log-level", "NOT-A-LEVEL"])  # logging.basicConfig raises: an internal error
    with pytest.raises(AirflowException) as err:
        op.execute(context={"ti": RecordingTI()})
    assert not isinstance(err.value, AirflowFailException)
    assert "step 'convert'" in str(err.value) and "exit code 1 (internal)" in str(err.value)


def test_exit_code_meanings():
    from operators.export_step import exit_code_meaning

    assert exit_code_meaning(3) == "validation failed"
    assert exit_code_meaning(4) == "capability missing"
    assert exit_code_meaning(-9) == "killed by SIGKILL"
    assert exit_code_meaning(77) == "unknown exit code"


def test_calibrate_without_an_int8_variant_starts_nothing(config_path, tmp_path):
    """`--variants onnx-fp32` (or an fp32-only model): calibrate has no work, so no process (or GPU pod) starts."""
    op = make_op(config_path, "calibrate", workdir=str(tmp_path / "does-not-exist"), variants="onnx-fp32")
    result = op.execute(context={"ti": RecordingTI()})
    assert result["skipped"] is True and "nothing to calibrate" in result["reason"]
    assert op._proc is None
