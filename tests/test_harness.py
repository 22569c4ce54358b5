"""The shared fixtures themselves: a real S3 API over HTTP reachable by boto3 and by Airflow's S3Hook."""

from __future__ import annotations

import os
import sqlite3
import urllib.request


def test_moto_is_a_real_http_server(s3_endpoint, s3_client):
    assert s3_endpoint.startswith("http://127.0.0.1:")
    s3_client.create_bucket(Bucket="harness-bucket")
    s3_client.put_object(Bucket="harness-bucket", Key="a/b.txt", Body=b"hello")
    # Plain HTTP, no SDK: the bytes really travel over the loopback socket.
    url = s3_client.generate_presigned_url("get_object", Params={"Bucket": "harness-bucket", "Key": "a/b.txt"})
    assert url.startswith(s3_endpoint)
    with urllib.request.urlopen(url) as r:
        assert r.read() == b"hello"


def test_s3hook_uses_the_aws_default_connection(s3_client):
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    s3_client.create_bucket(Bucket="hook-bucket")
    s3_client.put_object(Bucket="hook-bucket", Key="ckpt/1/model.safetensors", Body=b"x" * 10)
    hook = S3Hook(aws_conn_id="aws_default")
    assert hook.list_keys("hook-bucket", prefix="ckpt/") == ["ckpt/1/model.safetensors"]


def test_state_is_reset_between_tests(s3_client):
    assert "harness-bucket" not in [b["Name"] for b in s3_client.list_buckets()["Buckets"]]


def test_airflow_home_is_isolated_and_migrated(airflow_home):
    assert os.environ["AIRFLOW_HOME"] == str(airflow_home)
    assert os.environ["AIRFLOW__CORE__DAGS_FOLDER"].endswith("/dags")
    with sqlite3.connect(airflow_home / "airflow.db") as db:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
    assert {"dag", "dag_run", "task_instance", "alembic_version"} <= tables
