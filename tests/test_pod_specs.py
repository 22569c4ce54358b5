"""Every export step's pod renders offline and validates strictly against the Kubernetes 1.33 schema."""

from __future__ import annotations

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient

from export_lib.config import STEPS

K8S_VERSION = "1.33.0"
WORKDIR = "/workspace/digits-cnn/0123456789abcdef"


@pytest.fixture(scope="module")
def config():
    from operators.paths import DEFAULT_CONFIG_PATH
    from operators.runtime import load_export_config

    return load_export_config(DEFAULT_CONFIG_PATH)


def make_op(config, step, **kwargs):
    from operators.export_step import export_step
    from operators.paths import DEFAULT_CONFIG_PATH

    if step != "sync":
        kwargs.setdefault("workdir", WORKDIR)
    return export_step(step, export_config=config, config_path=DEFAULT_CONFIG_PATH, runtime="kubernetes",
                       model="digits-cnn", **kwargs)


def render(op) -> dict:
    pod = op.build_pod_request_obj(dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)


def base_container(pod: dict) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == "base")


@pytest.mark.parametrize("step", STEPS)
def test_every_step_pod_validates_strictly(config, step):
    pod = render(make_op(config, step))
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    args = base_container(pod)["args"]
    assert args[:5] == [step, "--config", "/etc/model-export/export.yaml", "--model", "digits-cnn"]
    assert "--xcom" in args  # the result comes back through the XCom sidecar
    if step == "sync":
        assert args[args.index("--workspace") + 1] == config.kubernetes.workspace_mount
    else:
        assert args[args.index("--workdir") + 1] == WORKDIR
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert "airflow-xcom-sidecar" in names


@pytest.mark.parametrize(("step", "pool"), [("convert", "gpu-convert"), ("calibrate", "gpu-calibrate"),
                                            ("validate", "gpu-convert"), ("benchmark", "gpu-convert")])
def test_gpu_step_requests_a_gpu_on_its_pool(config, step, pool):
    pod = render(make_op(config, step))
    spec, expected = pod["spec"], config.kubernetes.pools[pool]
    limits = base_container(pod)["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == str(expected.gpus) == "1"
    assert spec["nodeSelector"] == expected.node_selector
    got = [{k: v for k, v in t.items() if v is not None} for t in spec["tolerations"]]
    want = [t.model_dump(exclude_none=True) for t in expected.tolerations]
    assert got == want and any(t["key"] == "nvidia.com/gpu" for t in got)
    assert pod["metadata"]["labels"]["model-export.io/pool"] == pool
    assert pod["metadata"]["labels"]["model-export.io/model"] == "digits-cnn"


def test_calibration_and_conversion_land_on_different_pools(config):
    convert, calibrate = render(make_op(config, "convert")), render(make_op(config, "calibrate"))
    assert convert["spec"]["nodeSelector"] != calibrate["spec"]["nodeSelector"]
    assert base_container(calibrate)["resources"]["limits"]["memory"] == "32Gi"


@pytest.mark.parametrize("step", ["sync", "select", "publish"])
def test_cpu_step_requests_no_gpu(config, step):
    pod = render(make_op(config, step))
    resources = base_container(pod)["resources"]
    assert "nvidia.com/gpu" not in resources.get("limits", {})
    assert "nvidia.com/gpu" not in resources.get("requests", {})
    assert not pod["spec"].get("tolerations")
    assert pod["spec"].get("nodeSelector", {}) == config.kubernetes.pools["cpu"].node_selector


def test_secret_pvc_configmap_and_identity(config):
    k = config.kubernetes
    pod = render(make_op(config, "convert"))
    spec, container = pod["spec"], base_container(pod)
    assert pod["metadata"]["namespace"] == k.namespace
    assert spec["serviceAccountName"] == k.service_account
    assert container["image"] == k.image
    assert container["command"] == ["python", "-m", "export_lib"]
    assert {"secretRef": {"name": k.s3_secret}} in container["envFrom"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["export-config"]["configMap"]["name"] == k.config_map
    assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == k.workspace_pvc
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["export-config"] == {"name": "export-config", "mountPath": k.config_mount, "readOnly": True}
    assert mounts["workspace"]["mountPath"] == k.workspace_mount
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["EXPORT_CONFIG"] == f"{k.config_mount}/export.yaml"


def test_runtime_flags_and_templated_arguments(config):
    op = make_op(config, "sync", checkpoint_uri="s3://train-bucket/digits-cnn/000200/", force=True,
                 variants=["onnx-fp32", "onnx-int8"], extra_args=["--log-level", "DEBUG"])
    assert op.do_xcom_push is True
    assert op.on_finish_action.value == "delete_succeeded_pod"
    assert {"model", "workdir", "checkpoint_uri", "variants", "extra_args"} <= set(op.template_fields)
    args = base_container(render(op))["args"]
    assert args[args.index("--checkpoint-uri") + 1] == "s3://train-bucket/digits-cnn/000200/"
    assert "--force" in args
    assert args[args.index("--variants") + 1] == "onnx-fp32,onnx-int8"
    assert args[-3:] == ["--log-level", "DEBUG", "--xcom"]
    deferrable = make_op(config, "convert", deferrable=True, on_finish_action="keep_pod")
    assert deferrable.deferrable and deferrable.on_finish_action.value == "keep_pod"


def test_workdir_taken_from_the_sync_result(config):
    op = make_op(config, "validate", workdir={"workdir": "/workspace/digits-cnn/feedfacecafebeef", "version": "x"})
    args = base_container(render(op))["args"]
    assert args[args.index("--workdir") + 1] == "/workspace/digits-cnn/feedfacecafebeef"


def test_step_settings_from_config(config):
    op = make_op(config, "calibrate")
    assert op.pool == config.pipeline.gpu_pool
    assert op.execution_timeout.total_seconds() == 60 * config.pipeline.steps["calibrate"].timeout_minutes
    assert op.retries == config.pipeline.steps["calibrate"].retries and op.retry_exponential_backoff
    assert make_op(config, "publish").pool != config.pipeline.gpu_pool


def test_the_dag_uses_pods_when_the_runtime_is_kubernetes(airflow_home, monkeypatch):
    """The runtime is configuration: the same DAG file builds pod operators under EXPORT_RUNTIME=kubernetes."""
    from airflow.dag_processing.dagbag import DagBag

    from operators.export_pod import KubernetesExportStepOperator
    from operators.export_step import LocalExportStepOperator
    from operators.paths import REPO_ROOT

    kinds = {}
    for runtime in ("kubernetes", "local"):
        monkeypatch.setenv("EXPORT_RUNTIME", runtime)
        dag = DagBag(dag_folder=str(REPO_ROOT / "dags" / "model_export_nightly.py")).dags["model_export_nightly"]
        kinds[runtime] = {type(dag.get_task(f"export_model.{s}")) for s in STEPS}
    assert kinds == {"kubernetes": {KubernetesExportStepOperator}, "local": {LocalExportStepOperator}}


class _RecordingTI:
    """Stands in for the task instance the provider and the operator push XComs to."""

    def __init__(self):
        self.xcoms: dict[str, object] = {}

    def xcom_push(self, key, value):
        self.xcoms[key] = value


@pytest.fixture
def kube_api(tmp_path, monkeypatch):
    """A minimal Kubernetes API on loopback (pods read/patch/delete, events) behind a real kubeconfig, so the
    provider's own cleanup code runs unchanged. `pods[name]` is the API dict the server returns."""
    import json
    import re
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    pods: dict[str, dict] = {}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            if self.path.split("?")[0].endswith("/events"):
                body = {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": []}
            elif (m := re.search(r"/pods/([^/?]+)", self.path)) and m.group(1) in pods:
                body = pods[m.group(1)]
            else:
                self.send_response(404)
                self.end_headers()
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PATCH = do_DELETE = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
        "users": [{"name": "t", "user": {"token": "t"}}]}))
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": str(kubeconfig), "in_cluster": False}}))
    yield pods
    server.shutdown()


def _finished_pod(op, pods, exit_code: int, message: str | None, reason: str = "Error"):
    from kubernetes.client import models as k8s

    pod = op.build_pod_request_obj(dry_run=True)
    pod.metadata.name = f"export-validate-{exit_code}"
    terminated = k8s.V1ContainerStateTerminated(exit_code=exit_code, message=message, reason=reason)
    pod.status = k8s.V1PodStatus(phase="Failed" if exit_code else "Succeeded", container_statuses=[
        k8s.V1ContainerStatus(name="base", image=op.image, image_id="", ready=False, restart_count=0,
                              state=k8s.V1ContainerState(terminated=terminated))])
    pods[pod.metadata.name] = ApiClient().sanitize_for_serialization(pod)
    return pod


def test_a_failed_pod_fails_like_the_local_runtime(config, kube_api):
    """Exit code 3 in the pod: no retry, model/step/code/engine message in the error and the `failure` XCom."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    op = make_op(config, "validate")
    assert base_container(render(op))["terminationMessagePolicy"] == "FallbackToLogsOnError"
    tail = ("2026-11-22 02:14:03,001 INFO export_lib.validate: onnx-int8: parity checked on 16 samples\n"
            "2026-11-22 02:14:03,120 ERROR export_lib.cli: validate failed (VALIDATION_FAILED): onnx-int8 "
            "top1_accuracy 0.91 is below the threshold 0.95\n")
    ti = _RecordingTI()
    pod = _finished_pod(op, kube_api, 3, tail)
    with pytest.raises(AirflowFailException) as err:
        op.cleanup(pod=pod, remote_pod=pod, context={"ti": ti})
    assert str(err.value) == ("export of model 'digits-cnn' failed at step 'validate' with exit code 3 (validation "
                              "failed): onnx-int8 top1_accuracy 0.91 is below the threshold 0.95")
    assert ti.xcoms["failure"]["exit_code"] == 3 and ti.xcoms["failure"]["step"] == "validate"
    assert ti.xcoms["failure"]["error"].startswith("onnx-int8 top1_accuracy 0.91")

    # An internal error (exit 1) or an OOM kill stays retryable; the message is the exception / the reason.
    pod = _finished_pod(op, kube_api, 1, "Traceback (most recent call last):\n  ...\n"
                                         "RuntimeError: CUDA error: out of memory\n")
    with pytest.raises(AirflowException) as err:
        op.cleanup(pod=pod, remote_pod=pod, context={"ti": _RecordingTI()})
    assert not isinstance(err.value, AirflowFailException)
    assert str(err.value).endswith("(internal): RuntimeError: CUDA error: out of memory")
    pod = _finished_pod(op, kube_api, 137, None, reason="OOMKilled")
    with pytest.raises(AirflowException, match=r"exit code 137 .*: OOMKilled") as err:
        op.cleanup(pod=pod, remote_pod=pod, context={"ti": _RecordingTI()})
    assert not isinstance(err.value, AirflowFailException)

    succeeded = _finished_pod(op, kube_api, 0, None, reason="Completed")
    op.cleanup(pod=succeeded, remote_pod=succeeded, context={"ti": _RecordingTI()})  # no exception
