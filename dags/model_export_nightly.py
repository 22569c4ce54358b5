"""Nightly model export: newest checkpoint -> ONNX (+ INT8, TensorRT) -> validated, benchmarked -> published.

Models, schedule, node pools and step settings come from the export config (`include/config/export.yaml`, or the
Airflow Variable `export_config` / env `EXPORT_CONFIG`); the runtime (GPU pods or local processes) from the
Variable `export_runtime` / env `EXPORT_RUNTIME`. Adding a model is a config change, never an edit here.

Per model (one mapped `export_model` group each, so one failing model never stops the others):
sync -> skip if that version is already published -> convert -> calibrate -> validate -> benchmark -> select ->
publish -> hand-over (asset event for the staging deploy). `summary` reports every model and fails the run if
any model failed. Trigger with conf `{"models": [...], "force": false, "variants": [...], "checkpoint_uri": null}`
(see docs/ci-trigger.md).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, CronTriggerTimetable, TriggerRule, get_current_context, task, task_group

from operators.notify import ExportFailureNotifier
from operators.pipeline import export_chain, plan_runs, summarize_run, trigger_params
from operators.runtime import load_export_config, resolve_config_path

CONFIG_PATH = resolve_config_path()
CONFIG = load_export_config(CONFIG_PATH)

with DAG(
    dag_id="model_export_nightly",
    description="Nightly export of the newest checkpoints to validated, benchmarked ONNX/TensorRT artifacts",
    doc_md=__doc__,
    # No start_date + run_immediately=False: unpausing (e.g. by the CI trigger) never fires a catch-up export;
    # the first scheduled run is the next cron time (UTC).
    schedule=CronTriggerTimetable(CONFIG.pipeline.schedule, timezone="UTC", run_immediately=False),
    catchup=False,
    max_active_runs=1,
    tags=["model-export", "nightly", "ml-platform"],
    params=trigger_params(CONFIG),
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=20),
        "execution_timeout": timedelta(minutes=10),  # plan/summary; export steps use pipeline.steps.<step>
        "on_failure_callback": ExportFailureNotifier(),
    },
) as dag:

    @task
    def plan() -> list[dict]:
        """The models of this run, from the trigger form / conf (default: every configured model)."""
        return plan_runs(CONFIG, get_current_context()["params"])

    @task_group(group_id="export_model")
    def export_model(model: str, variants: str, checkpoint_uri: str | None, force: bool) -> None:
        export_chain(CONFIG, str(CONFIG_PATH), model=model, variants=variants, checkpoint_uri=checkpoint_uri,
                     force=force)

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def summary(runs: list[dict] | None) -> list[dict]:
        """Per model: published / up to date / failed at <step> with the reason."""
        return summarize_run(runs, get_current_context())

    runs = plan()
    export_model.expand_kwargs(runs) >> summary(runs)
