"""Shared test harness: an isolated Airflow home, a real S3 API (moto server over HTTP), markers.

Airflow reads its configuration when first imported, so the environment is set in `pytest_configure`,
before any test module imports Airflow.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INCLUDE = REPO / "include"
for p in (INCLUDE, REPO / "plugins"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="airflow-home-"))


def pytest_configure(config):
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request access log
    os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
    os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
    os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}"
    os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
    os.environ.setdefault("EXPORT_RUNTIME", "local")
    # Subprocesses started by tests (the export CLI) must find the engine and the sample models.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(INCLUDE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # Never let a test reach real AWS.
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        os.environ.pop(k, None)
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


def pytest_unconfigure(config):
    shutil.rmtree(_AIRFLOW_HOME, ignore_errors=True)


def _have_gpu_stack() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except Exception as e:
        return False, f"TensorRT is not importable here ({type(e).__name__}: {e}); run on a GPU node with TensorRT"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "CUDA is not available (torch.cuda.is_available() is False)"
    except Exception as e:
        return False, f"torch with CUDA is not importable ({e})"
    return True, ""


def pytest_collection_modifyitems(config, items):
    gpu_items = [i for i in items if "gpu" in i.keywords]
    if not gpu_items:
        return
    ok, reason = _have_gpu_stack()
    if not ok:
        skip = pytest.mark.skip(reason=f"gpu test skipped: {reason}")
        for item in gpu_items:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------------ Airflow
@pytest.fixture(scope="session")
def airflow_home() -> Path:
    """An isolated AIRFLOW_HOME with a migrated SQLite metadata DB (created once per session)."""
    from airflow.utils import db

    db.resetdb()
    return _AIRFLOW_HOME


# -------------------------------------------------------------------------------------------------- S3
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 API over HTTP on a free loopback port (moto's threaded server)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    yield url
    server.stop()


@pytest.fixture
def s3_endpoint(moto_server, monkeypatch) -> str:
    """moto's endpoint with a clean state, wired into boto3's environment and the `aws_default` connection."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")).read()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps({
            "conn_type": "aws", "login": "testing", "password": "testing",
            "extra": {"endpoint_url": moto_server, "region_name": "us-east-1"},
        }),
    )
    return moto_server


@pytest.fixture
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")
