"""The CLI contract every runtime relies on: usage, exit codes, result file, XCom sidecar file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from storage_helpers import EXPORTS, write_config

from export_lib.results import ExitCode

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "export_lib", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, cwd=REPO, check=False)


def test_usage_and_unknown_command():
    bare = cli()
    assert bare.returncode == ExitCode.BAD_INPUT and "convert" in bare.stdout and "publish" in bare.stdout
    assert cli("--help").returncode == ExitCode.OK
    unknown = cli("exprot")
    assert unknown.returncode == ExitCode.BAD_INPUT and "unknown command 'exprot'" in unknown.stderr
    bad_flag = cli("versions", "--modle", "x")
    assert bad_flag.returncode == ExitCode.BAD_INPUT and "--model" in bad_flag.stderr


def test_result_file_and_xcom_sidecar_file(tmp_path, s3_client):
    s3_client.create_bucket(Bucket=EXPORTS)
    config = write_config(tmp_path)
    xcom, result = tmp_path / "xcom" / "return.json", tmp_path / "result.json"
    proc = cli("versions", "--config", config, "--model", "digits", "--result-file", result, "--xcom",
               env={"EXPORT_XCOM_RETURN_PATH": str(xcom)})
    assert proc.returncode == ExitCode.OK, proc.stderr
    for path in (xcom, result):
        payload = json.loads(path.read_text())
        assert payload["step"] == "versions" and payload["status"] == "ok"
        assert payload["versions"] == [] and payload["seconds"] >= 0


def test_failure_writes_the_error_but_never_an_xcom(tmp_path):
    xcom, result = tmp_path / "xcom" / "return.json", tmp_path / "result.json"
    proc = cli("versions", "--config", tmp_path / "missing.yaml", "--model", "digits", "--result-file", result,
               "--xcom", env={"EXPORT_XCOM_RETURN_PATH": str(xcom)})
    assert proc.returncode == ExitCode.BAD_INPUT
    assert "missing.yaml' does not exist" in proc.stderr
    payload = json.loads(result.read_text())
    assert payload["status"] == "failed" and payload["exit_code"] == 2 and "does not exist" in payload["error"]
    assert not xcom.exists(), "a failed step must not hand a result to the XCom sidecar"
