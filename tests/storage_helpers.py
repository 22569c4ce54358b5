"""Helpers shared by the storage tests: a config on disk, checkpoints in S3, fake export outputs, a fault proxy."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from export_lib.config import load_config

REPO = Path(__file__).resolve().parents[1]
TRAIN = "train-bucket"
EXPORTS = "model-exports"


def write_config(tmp_path: Path, *, checkpoint_uri: str = f"s3://{TRAIN}/digits/", select: str = "step",
                 marker: str | None = "_COMPLETE", quiescence: int = 600, eval_data: str | None = None,
                 workspace: Path | None = None, name: str = "digits") -> Path:
    model = {
        "name": name, "factory": "model_zoo.digits:DigitsCNN",
        "checkpoint": {"uri": checkpoint_uri, "select": select, "complete_marker": marker,
                       "quiescence_seconds": quiescence},
        "inputs": [{"name": "pixels", "shape": ["batch", 1, 8, 8], "dynamic": {"batch": {"min": 1, "opt": 4,
                                                                                            "max": 16}}}],
        "outputs": ["logits"],
        "variants": ["onnx-fp32", "onnx-int8"],
    }
    if eval_data:
        model["accuracy"] = {"eval_data": eval_data}
    cfg = {"pipeline": {"export_bucket": EXPORTS, "export_prefix": "exports",
                        "workspace": str(workspace or tmp_path / "ws")},
           "models": [model]}
    path = tmp_path / "export.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def spec_of(config_path: Path, name: str = "digits"):
    return load_config(config_path).model(name)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_checkpoint(client, folder: str, files: dict[str, bytes], *, marker: str | None = "_COMPLETE",
                   sums: dict[str, str] | bool = False, bucket: str = TRAIN, prefix: str = "digits") -> str:
    """Upload files to s3://bucket/prefix/folder/, then SHA256SUMS (True: correct ones), then the marker."""
    base = f"{prefix}/{folder}"
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{base}/{name}", Body=data)
    if sums:
        table = {n: sha(d) for n, d in files.items()} if sums is True else sums
        text = "".join(f"{h}  {n}\n" for n, h in table.items())
        client.put_object(Bucket=bucket, Key=f"{base}/SHA256SUMS", Body=text.encode())
    if marker:
        client.put_object(Bucket=bucket, Key=f"{base}/{marker}", Body=b"")
    return f"s3://{bucket}/{base}/"


def make_buckets(client) -> None:
    for b in (TRAIN, EXPORTS):
        client.create_bucket(Bucket=b)


def fake_export_outputs(workdir: Path, *, selected: str = "onnx-int8", payload: bytes = b"onnx") -> None:
    """What convert/calibrate/validate/benchmark/select leave in a workdir (content is irrelevant to storage)."""
    (workdir / "onnx-fp32").mkdir(parents=True, exist_ok=True)
    (workdir / "onnx-fp32" / "model.onnx").write_bytes(payload + b"-fp32")
    (workdir / "onnx-fp32" / "model.onnx.data").write_bytes(payload * 100)
    (workdir / "onnx-int8").mkdir(parents=True, exist_ok=True)
    (workdir / "onnx-int8" / "model.onnx").write_bytes(payload + b"-int8")
    reports = workdir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "validation.json").write_text(json.dumps({"passed": True, "variants": {"onnx-int8": "ok"}}))
    (reports / "benchmark.json").write_text(json.dumps({"onnx-int8": {"p50_ms": 1.0}}))
    (reports / "selection.json").write_text(json.dumps({"selected": selected, "why": "fastest passing"}))
    (reports / "gx_result.json").write_text(json.dumps({"success": True, "statistics": {"evaluated": 4},
                                                        "results": ["..."]}))
    results = workdir / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "convert.json").write_text(json.dumps({"library_versions": {"torch": "2.13.0", "onnx": "1.19"}}))


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO / "include"), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "export_lib", *args], env=full_env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


# ------------------------------------------------------------------------------------------ fault proxy
class FaultProxy:
    """A ThreadingHTTPServer in front of moto. `rule(method, path, headers, nth)` returns None to forward
    the request, or (status, s3 error code) to answer with an S3 error instead; `nth` counts requests per
    (method, path) from 1. `on_request(method, path)` (optional) runs before forwarding (e.g. to stall);
    returning False answers 500 instead of forwarding."""

    def __init__(self, upstream: str, rule: Callable[[str, str, dict, int], tuple[int, str] | None],
                 on_request: Callable[[str, str], bool | None] | None = None):
        self.upstream = urlsplit(upstream)
        self.rule, self.on_request = rule, on_request
        self.counts: Counter = Counter()
        self.faults: Counter = Counter()
        self.log: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urlsplit(self.path).path
                with proxy._lock:
                    proxy.counts[(self.command, path)] += 1
                    nth = proxy.counts[(self.command, path)]
                fault = proxy.rule(self.command, path, dict(self.headers), nth)
                if fault is None and proxy.on_request and proxy.on_request(self.command, path) is False:
                    fault = (500, "InternalError")
                if fault is not None:
                    status, code = fault
                    with proxy._lock:
                        proxy.faults[code] += 1
                        proxy.log.append((self.command, path, status))
                    err = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                           f"<Message>injected {code}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(err)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                with proxy._lock:
                    proxy.log.append((self.command, path, resp.status))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                        self.send_header(k, v)
                # HEAD answers carry the object's length with no body: pass it through.
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
