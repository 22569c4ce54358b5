"""One operator family for the export steps: `python -m export_lib <step> ...` in a GPU pod or a local process.

- `LocalExportStepOperator`: the CLI as a subprocess of the worker (`PYTHONPATH=include`), S3 credentials and
  endpoint from the Airflow connection, the child's log streamed into the task log, the JSON result returned.
- `KubernetesExportStepOperator` (`operators.export_pod`): a KubernetesPodOperator built from `config.kubernetes`,
  the JSON result returned through the XCom sidecar.

`export_step()` picks the class from the configured runtime (`operators.runtime`), so switching runtimes is a
Variable or an environment change, not a DAG edit. The pod class is imported only for the kubernetes runtime: the
provider costs over a second to import, which the local runtime's DAG parse does not pay.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from export_lib.config import QUANTIZED_VARIANTS, STEPS, ExportConfig
from export_lib.results import ExitCode
from operators.paths import INCLUDE_DIR, REPO_ROOT
from operators.runtime import Runtime, local_workspace, resolve_runtime

if TYPE_CHECKING:
    from airflow.sdk import Context

# A failure with one of these codes is deterministic: retrying gives the same answer, so fail at once.
NO_RETRY_CODES = frozenset({ExitCode.BAD_INPUT, ExitCode.VALIDATION_FAILED, ExitCode.CAPABILITY_MISSING})
FAILURE_XCOM_KEY = "failure"


def exit_code_meaning(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    try:
        return ExitCode(code).name.lower().replace("_", " ")
    except ValueError:
        return "unknown exit code"


class ExportStepMixin:
    """What both runtimes share: the step's CLI arguments, its Airflow settings from the config, failures."""

    # Templated where users expect them; `workdir` may also be the sync step's result (its `workdir` is used),
    # `model`/`variants`/`force`/`checkpoint_uri` may be mapped task-group arguments.
    export_template_fields: tuple[str, ...] = ("model", "workdir", "checkpoint_uri", "variants", "force",
                                               "extra_args")

    step: str
    model: Any
    workdir: Any
    checkpoint_uri: Any
    variants: Any
    force: Any
    extra_args: Any
    export_config: ExportConfig
    config_path: str

    def _init_export(self, *, step: str, export_config: ExportConfig, config_path: str | Path, model: Any,
                     workdir: Any, checkpoint_uri: Any, variants: Any, force: Any,
                     extra_args: Sequence[str] | None) -> None:
        if step not in STEPS:
            raise ValueError(f"unknown export step '{step}'; steps are {list(STEPS)}")
        if step != "sync" and workdir is None:
            raise ValueError(f"step '{step}' needs a workdir (a path, or the sync step's result)")
        self.step = step
        self.export_config = export_config
        self.config_path = str(config_path)
        self.model = model
        self.workdir = workdir
        self.checkpoint_uri = checkpoint_uri
        self.variants = variants
        self.force = force
        self.extra_args = list(extra_args or [])

    @staticmethod
    def step_defaults(config: ExportConfig, step: str) -> dict[str, Any]:
        """BaseOperator settings of a step from `pipeline.steps.<step>`: pool, timeout, retries with backoff."""
        settings = config.pipeline.steps[step]
        out: dict[str, Any] = {
            "execution_timeout": timedelta(minutes=settings.timeout_minutes),
            "retries": settings.retries,
            "retry_delay": timedelta(seconds=30),
            "retry_exponential_backoff": True,
            "max_retry_delay": timedelta(minutes=20),
        }
        if settings.use_gpu_pool:
            out["pool"] = config.pipeline.gpu_pool
        return out

    # ------------------------------------------------------------------------------------------ CLI arguments
    def resolved_workdir(self) -> str | None:
        if isinstance(self.workdir, dict):
            if not self.workdir.get("workdir"):
                raise AirflowException(f"model '{self.model}' step '{self.step}': the sync result has no workdir "
                                       f"({self.workdir})")
            return str(self.workdir["workdir"])
        return str(self.workdir) if self.workdir else None

    def resolved_variants(self) -> str:
        if not self.variants:
            return ""
        return self.variants if isinstance(self.variants, str) else ",".join(self.variants)

    def cli_arguments(self, *, config_path: str, workspace: str) -> list[str]:
        args = [self.step, "--config", config_path, "--model", str(self.model)]
        if self.step == "sync":
            args += ["--workspace", workspace]
            if self.checkpoint_uri:
                args += ["--checkpoint-uri", str(self.checkpoint_uri)]
            if _truthy(self.force):
                args.append("--force")
        else:
            args += ["--workdir", self.resolved_workdir() or ""]
        if variants := self.resolved_variants():
            args += ["--variants", variants]
        return args + [str(a) for a in self.extra_args]

    def nothing_to_do(self) -> dict[str, Any] | None:
        """The result of a step with no work in this run, decided here so no process or GPU pod starts for it:
        calibrate when none of the run's variants is quantized (e.g. `variants: [onnx-fp32]`)."""
        if self.step != "calibrate":
            return None
        requested = [v for v in self.resolved_variants().split(",") if v]
        variants = [v for v in self.export_config.model(str(self.model)).variants if not requested or v in requested]
        if QUANTIZED_VARIANTS & set(variants):
            return None
        reason = f"no INT8 variant among {variants}: nothing to calibrate"
        self.log.info("model %s, step %s: %s", self.model, self.step, reason)
        return {"step": self.step, "status": "ok", "model": str(self.model), "skipped": True, "reason": reason}

    # ------------------------------------------------------------------------------------------------ failure
    def failure(self, context: Context | None, code: int, result: dict[str, Any] | None) -> AirflowException:
        """The exception for a failed step, naming model, step, exit code and the engine's message."""
        error = (result or {}).get("error") or "no result written; see the step's log above"
        message = (f"export of model '{self.model}' failed at step '{self.step}' with exit code {code} "
                   f"({exit_code_meaning(code)}): {error}")
        if context is not None:
            # Kept as an XCom so the run's summary can say why, next to what the others did.
            context["ti"].xcom_push(key=FAILURE_XCOM_KEY, value={
                "model": str(self.model), "step": self.step, "exit_code": code,
                "meaning": exit_code_meaning(code), "error": str(error)[:2000]})
        if code in NO_RETRY_CODES:
            return AirflowFailException(message)
        return AirflowException(message)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class LocalExportStepOperator(ExportStepMixin, BaseOperator):
    """Runs `python -m export_lib <step>` as a child process of the worker and returns its JSON result."""

    template_fields: Sequence[str] = ExportStepMixin.export_template_fields
    ui_color = "#e8f4fd"

    def __init__(self, *, step: str, export_config: ExportConfig, config_path: str | Path, model: Any,
                 workdir: Any = None, checkpoint_uri: Any = None, variants: Any = None, force: Any = False,
                 extra_args: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**{**kwargs, **self.step_defaults(export_config, step)})
        self._init_export(step=step, export_config=export_config, config_path=config_path, model=model,
                          workdir=workdir, checkpoint_uri=checkpoint_uri, variants=variants, force=force,
                          extra_args=extra_args)
        self._proc: subprocess.Popen[str] | None = None

    def child_env(self) -> dict[str, str]:
        """The worker's environment + the engine on PYTHONPATH + S3 access from the Airflow connection."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(INCLUDE_DIR), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the task log as they are written
        hook = S3Hook(aws_conn_id=self.export_config.pipeline.aws_conn_id)
        creds = hook.get_credentials()
        env["AWS_ACCESS_KEY_ID"] = creds.access_key
        env["AWS_SECRET_ACCESS_KEY"] = creds.secret_key
        if creds.token:
            env["AWS_SESSION_TOKEN"] = creds.token
        else:
            env.pop("AWS_SESSION_TOKEN", None)
        conn = hook.conn_config
        if conn.endpoint_url:  # the service-specific variable would win over the generic one in boto3
            env["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL_S3"] = conn.endpoint_url
        else:  # AWS itself: a worker's endpoint (e.g. a MinIO for something else) must not redirect the step
            env.pop("AWS_ENDPOINT_URL", None)
            env.pop("AWS_ENDPOINT_URL_S3", None)
        if conn.region_name:
            env["AWS_DEFAULT_REGION"] = conn.region_name
        return env

    def execute(self, context: Context) -> dict[str, Any]:
        if (result := self.nothing_to_do()) is not None:
            return result
        with tempfile.TemporaryDirectory(prefix=f"export-{self.step}-") as tmp:
            result_file = Path(tmp) / "result.json"
            workspace = local_workspace(self.export_config)
            cmd = [sys.executable, "-m", "export_lib",
                   *self.cli_arguments(config_path=self.config_path, workspace=str(workspace)),
                   "--result-file", str(result_file)]
            self.log.info("model %s, step %s: %s", self.model, self.step, shlex.join(cmd))
            code = self._run(cmd, self.child_env())
            result = json.loads(result_file.read_text()) if result_file.is_file() else None
        if code != 0:
            raise self.failure(context, code, result)
        if result is None:
            raise AirflowException(f"model '{self.model}' step '{self.step}' exited 0 but wrote no result file")
        self.log.info("model %s, step %s: result %s", self.model, self.step, json.dumps(result, sort_keys=True))
        return result

    def _run(self, cmd: list[str], env: dict[str, str]) -> int:
        # Own session: on timeout or kill the whole child process group goes, not just the Python parent.
        proc = self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                             cwd=REPO_ROOT, text=True, bufsize=1, start_new_session=True)
        try:
            for line in proc.stdout or ():
                self.log.info("%s", line.rstrip())
            return proc.wait()
        finally:
            self._terminate()

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        self.log.warning("stopping the %s process of model %s (pid %s)", self.step, self.model, proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def on_kill(self) -> None:
        self._terminate()


def export_step(step: str, *, export_config: ExportConfig, config_path: str | Path, runtime: Runtime | None = None,
                **kwargs: Any) -> BaseOperator:
    """The operator for `step` in the configured runtime (task_id defaults to the step name)."""
    runtime = runtime or resolve_runtime()
    kwargs.setdefault("task_id", step)
    if runtime == "kubernetes":
        from operators.export_pod import KubernetesExportStepOperator

        return KubernetesExportStepOperator(step=step, export_config=export_config, config_path=config_path,
                                            **kwargs)
    return LocalExportStepOperator(step=step, export_config=export_config, config_path=config_path, **kwargs)
