"""The kubernetes runtime: an export step as a pod on the step's node pool (`config.kubernetes`).

The pod runs the engine image's `python -m export_lib <step> ... --xcom`; the JSON result comes back through the
KubernetesPodOperator's XCom sidecar. Per step, `pipeline.steps.<step>.pool` names a `kubernetes.pools` entry:
its node selector, tolerations, `nvidia.com/gpu` limit and cpu/memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.utils.container import get_container_status
from airflow.sdk.exceptions import AirflowException, AirflowSkipException
from kubernetes.client import models as k8s

from export_lib.config import ExportConfig, PodPool
from operators.export_step import ExportStepMixin

if TYPE_CHECKING:
    from airflow.sdk import Context

# The ConfigMap must hold the export config under this key (kubectl create configmap --from-file=export.yaml=...).
CONFIG_MAP_KEY = "export.yaml"
LABEL_PREFIX = "model-export.io"


def pod_resources(pool: PodPool) -> k8s.V1ResourceRequirements:
    """cpu/memory requested and capped; GPUs are a limit only (Kubernetes sets the request equal to it)."""
    limits = {"cpu": pool.cpu, "memory": pool.memory}
    if pool.gpus:
        limits["nvidia.com/gpu"] = str(pool.gpus)
    return k8s.V1ResourceRequirements(requests={"cpu": pool.cpu, "memory": pool.memory}, limits=limits)


def engine_error(step: str, termination_message: str | None) -> str | None:
    """The engine's message from a failed pod's termination message (its last log lines, FallbackToLogsOnError):
    the text after the CLI's `<step> failed (<CODE>): `, else the last line (an internal error's exception)."""
    lines = (termination_message or "").strip().splitlines()
    marker = f"{step} failed ("
    for i in range(len(lines) - 1, -1, -1):
        if marker in lines[i]:
            head = lines[i].split(marker, 1)[1]
            return "\n".join([head.split("): ", 1)[-1], *lines[i + 1:]]).strip()
    return lines[-1].strip() if lines else None


def pod_tolerations(pool: PodPool) -> list[k8s.V1Toleration]:
    return [k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect)
            for t in pool.tolerations]


class KubernetesExportStepOperator(ExportStepMixin, KubernetesPodOperator):
    """An export step in a pod built from `config.kubernetes`; returns the step's JSON result."""

    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields,
                                      *ExportStepMixin.export_template_fields)
    ui_color = "#d5f5e3"

    def __init__(self, *, step: str, export_config: ExportConfig, config_path: str | Path, model: Any,
                 workdir: Any = None, checkpoint_uri: Any = None, variants: Any = None, force: Any = False,
                 extra_args: Sequence[str] | None = None, on_finish_action: str = "delete_succeeded_pod",
                 **kwargs: Any) -> None:
        k8s_cfg = export_config.kubernetes
        pool_name = export_config.pipeline.steps[step].pool
        pool = k8s_cfg.pools[pool_name]
        env = {"EXPORT_CONFIG": f"{k8s_cfg.config_mount}/{CONFIG_MAP_KEY}", "PYTHONUNBUFFERED": "1"}
        if k8s_cfg.s3_endpoint_url:
            env["AWS_ENDPOINT_URL"] = k8s_cfg.s3_endpoint_url
        pod_kwargs: dict[str, Any] = {
            "name": f"export-{step}",
            "namespace": k8s_cfg.namespace,
            "image": k8s_cfg.image,
            "image_pull_policy": k8s_cfg.image_pull_policy,
            "cmds": ["python", "-m", "export_lib"],
            "service_account_name": k8s_cfg.service_account,
            "node_selector": dict(pool.node_selector),
            "tolerations": pod_tolerations(pool),
            "container_resources": pod_resources(pool),
            "env_vars": env,
            # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the secret; without one, IRSA / the node role.
            "env_from": ([k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=k8s_cfg.s3_secret))]
                         if k8s_cfg.s3_secret else []),
            "volumes": [
                k8s.V1Volume(name="export-config",
                             config_map=k8s.V1ConfigMapVolumeSource(name=k8s_cfg.config_map)),
                k8s.V1Volume(name="workspace", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                    claim_name=k8s_cfg.workspace_pvc)),
            ],
            "volume_mounts": [
                k8s.V1VolumeMount(name="export-config", mount_path=k8s_cfg.config_mount, read_only=True),
                k8s.V1VolumeMount(name="workspace", mount_path=k8s_cfg.workspace_mount),
            ],
            "labels": {f"{LABEL_PREFIX}/step": step, f"{LABEL_PREFIX}/model": model,
                       f"{LABEL_PREFIX}/pool": pool_name},
            "do_xcom_push": True,
            "get_logs": True,
            "on_finish_action": on_finish_action,  # failed pods stay for `kubectl describe` / logs
            "log_events_on_failure": True,
            # The engine writes no termination-log file: on failure Kubernetes keeps the tail of its log (the
            # CLI's `<step> failed (<CODE>): <message>` line) as the termination message, read back in cleanup().
            "termination_message_policy": "FallbackToLogsOnError",
        }
        super().__init__(**{**pod_kwargs, **kwargs, **self.step_defaults(export_config, step)})
        self._init_export(step=step, export_config=export_config, config_path=config_path, model=model,
                          workdir=workdir, checkpoint_uri=checkpoint_uri, variants=variants, force=force,
                          extra_args=extra_args)

    def build_pod_request_obj(self, context: Context | None = None, *, dry_run: bool = False) -> k8s.V1Pod:
        # The CLI arguments come from the rendered templated fields (model, workdir from the sync result, ...).
        k8s_cfg = self.export_config.kubernetes
        self.arguments = [*self.cli_arguments(config_path=f"{k8s_cfg.config_mount}/{CONFIG_MAP_KEY}",
                                              workspace=k8s_cfg.workspace_mount), "--xcom"]
        self.labels = {**self.labels, f"{LABEL_PREFIX}/model": str(self.model)}
        return super().build_pod_request_obj(context, dry_run=dry_run)

    def cleanup(self, pod: k8s.V1Pod, remote_pod: k8s.V1Pod, xcom_result: dict | None = None,
                context: Context | None = None) -> None:
        """A failed pod fails the task as the local runtime does: model, step, exit code and the engine's message;
        exit codes 2/3/4 are not retried (AirflowFailException) and the `failure` XCom feeds the run summary.
        Both the sync and the deferrable paths end here."""
        try:
            super().cleanup(pod=pod, remote_pod=remote_pod, xcom_result=xcom_result, context=context)
        except AirflowSkipException:
            raise
        except AirflowException as e:
            status = get_container_status(remote_pod, self.base_container_name)
            terminated = status.state.terminated if status is not None and status.state is not None else None
            if terminated is None or not terminated.exit_code:
                raise
            error = engine_error(self.step, terminated.message) or terminated.reason
            raise self.failure(context, terminated.exit_code, {"error": error} if error else None) from e

    def execute(self, context: Context) -> Any:
        if (result := self.nothing_to_do()) is not None:
            return result
        self.log.info("model %s, step %s: pod on node pool '%s' with image %s", self.model, self.step,
                      self.export_config.pipeline.steps[self.step].pool, self.image)
        return super().execute(context)
