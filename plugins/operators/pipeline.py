"""Building blocks of the nightly export DAG: trigger form, plan, per-model chain, hand-over, run summary.

The DAG file stays declarative: it loads the config and wires these together. Every per-model task lives in the
mapped task group `export_model` (one map index per model), so a failing model never stops the others.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from airflow.sdk import Asset, AssetAlias, Param, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from export_lib.config import VARIANTS, ExportConfig
from operators.export_step import FAILURE_XCOM_KEY, export_step

log = logging.getLogger(__name__)

GROUP_ID = "export_model"
ENGINE_STEPS = ("convert", "calibrate", "validate", "benchmark", "select", "publish")
# Every published version is an event on the model's asset, emitted through this alias: a staging-deploy DAG can
# schedule on `Asset(model_asset_uri(config, model))` for one model or on the alias for all of them.
PUBLISHED_ALIAS = AssetAlias("model-export-published")
MAP_LABEL = "{{ task.model }}"  # the map index shows the model name in the UI


def asset_prefix(config: ExportConfig) -> str:
    p = config.pipeline
    return f"s3://{p.export_bucket}/{p.export_prefix.strip('/')}"


def model_asset_uri(config: ExportConfig, model: str) -> str:
    return f"{asset_prefix(config)}/{model}"


# ------------------------------------------------------------------------------------------------- trigger form
TRIGGER_KEYS = ("models", "force", "variants", "checkpoint_uri")


def trigger_params(config: ExportConfig) -> dict[str, Param]:
    names = [m.name for m in config.models]
    return {
        "models": Param(names, type="array", items={"type": "string", "enum": names}, uniqueItems=True,
                        examples=names, title="Models",
                        description="Models to export (empty = every configured model)."),
        "force": Param(False, type="boolean", title="Force",
                       description="Run every step even when this version is already published."),
        "variants": Param([], type="array", items={"type": "string", "enum": list(VARIANTS)}, uniqueItems=True,
                          examples=list(VARIANTS), title="Variants",
                          description="Restrict to these variants (empty = each model's configured variants; "
                                      "onnx-fp32 is always built). A different set is a different version."),
        "checkpoint_uri": Param(None, type=["null", "string"], pattern=r"^$|^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/|/)",
                                title="Checkpoint URI",
                                description="Pin one checkpoint folder (s3://bucket/prefix/<step>/, or an absolute "
                                            "path for a local checkpoint directory) instead of the newest complete "
                                            "one; needs exactly one model. Empty = newest."),
    }


def plan_runs(config: ExportConfig, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-model arguments of this run (one mapped task group instance each)."""
    configured = {m.name: m for m in config.models}
    # Airflow merges any conf key into params: a typo (`modle`) would otherwise export every model silently.
    unknown_keys = sorted(set(params) - set(TRIGGER_KEYS))
    if unknown_keys:
        raise AirflowFailException(f"unknown trigger conf keys {unknown_keys}; the conf takes {list(TRIGGER_KEYS)}")
    wanted = list(params.get("models") or configured)
    unknown = [m for m in wanted if m not in configured]
    if unknown:
        raise AirflowFailException(f"models {unknown} are not in the export config; configured: {sorted(configured)}")
    checkpoint_uri = params.get("checkpoint_uri") or None
    if checkpoint_uri and len(wanted) != 1:
        raise AirflowFailException(
            f"checkpoint_uri pins one checkpoint, so it needs exactly one model; got models={wanted}")
    requested = list(params.get("variants") or [])
    bad = [v for v in requested if v not in VARIANTS]
    if bad:
        raise AirflowFailException(f"unknown variants {bad}; variants are {list(VARIANTS)}")
    runs = []
    for name in wanted:
        # Only the requested variants this model has (the CLI rejects a variant a model is not configured for).
        # None of them configured for this model: onnx-fp32 only (always built), never the full configured set.
        variants = ([v for v in configured[name].variants if v in requested] or ["onnx-fp32"]) if requested else []
        runs.append({"model": name, "variants": ",".join(variants), "checkpoint_uri": checkpoint_uri,
                     "force": bool(params.get("force", False))})
    return runs


# ------------------------------------------------------------------------------------------ per-model chain
def _label(model: str) -> None:
    get_current_context()["model_label"] = model


@task(map_index_template="{{ model_label }}")
def needs_export(synced: dict[str, Any], force: bool) -> str:
    """Skip (and so skip the export steps after it) when this version is already published, unless forced.

    A skip that cascades through the default `all_success` trigger rule, not a ShortCircuitOperator: inside a
    mapped task group, Airflow 3.3 looks the short-circuit decision up at map index -1 and runs the steps anyway
    (apache/airflow#67265).
    """
    _label(synced["model"])
    if synced.get("published") and not force:
        raise AirflowSkipException(f"{synced['model']} version {synced['version']} is already published: "
                                   "nothing new, skipping the export steps")
    reason = "forced re-export" if synced.get("published") else "new version, exporting"
    log.info("%s version %s: %s", synced["model"], synced["version"], reason)
    return reason


@task(outlets=[PUBLISHED_ALIAS], map_index_template="{{ model_label }}")
def hand_over(published: dict[str, Any], asset_uri_prefix: str, **context: Any) -> dict[str, Any]:
    """Emit the asset event the staging deploy is scheduled on (only for a version published by this run)."""
    model = published["model"]
    _label(model)
    if published.get("already_published"):
        raise AirflowSkipException(f"{model} {published['version']} was already published: no new hand-over")
    extra = {"model": model, "version": published["version"], "manifest_uri": published["manifest_uri"],
             "selected": published.get("selected_variant")}
    asset = Asset(f"{asset_uri_prefix}/{model}")
    context["outlet_events"][PUBLISHED_ALIAS].add(asset, extra=extra)
    log.info("handed %s over to staging: asset %s %s", model, asset.uri, json.dumps(extra))
    return extra


def export_chain(config: ExportConfig, config_path: str, *, model: Any, variants: Any, checkpoint_uri: Any,
                 force: Any) -> None:
    """sync -> skip if published -> convert -> calibrate -> validate -> benchmark -> select -> publish -> hand-over.

    Called inside the mapped task group; the arguments are that group's mapped arguments.
    """
    common = {"export_config": config, "config_path": config_path, "model": model, "variants": variants,
              "map_index_template": MAP_LABEL}
    sync = export_step("sync", checkpoint_uri=checkpoint_uri, force=force, **common)
    previous = needs_export(sync.output, force)
    sync >> previous
    for step in ENGINE_STEPS:
        # `workdir=sync.output`: each step reads the work directory sync chose (same map index).
        op = export_step(step, workdir=sync.output, **common)
        previous >> op
        previous = op
    previous >> hand_over(previous.output, asset_prefix(config))


# ------------------------------------------------------------------------------------------------ summary
def _states(context: dict[str, Any]) -> dict[tuple[str, int], str]:
    ti, run_id = context["ti"], context["run_id"]
    raw = ti.get_task_states(dag_id=ti.dag_id, run_ids=[run_id], task_group_id=GROUP_ID).get(run_id, {})
    out = {}
    for key, state in raw.items():
        task_id, _, index = key.rpartition("_")
        if index.isdigit():
            out[task_id.removeprefix(f"{GROUP_ID}."), int(index)] = state
    return out


def summarize_run(runs: list[dict[str, Any]] | None, context: dict[str, Any]) -> list[dict[str, Any]]:
    """What happened to each model, from task states and results; fails the run if any model failed."""
    if runs is None:  # `plan` failed (e.g. a bad trigger conf): nothing ran; a retry would not change that
        raise AirflowFailException("no run plan: the `plan` task failed, so no model was exported; its log names "
                                   "the problem (e.g. a bad trigger conf)")
    ti = context["ti"]
    states = _states(context)
    steps = ("sync", "needs_export", *ENGINE_STEPS, "hand_over")

    def pull(task_id: str, index: int, key: str = "return_value") -> Any:
        # Only where the task ran: asking for a missing XCom logs an error in the task SDK.
        if states.get((task_id, index)) not in ("success", "failed"):
            return None
        return ti.xcom_pull(task_ids=f"{GROUP_ID}.{task_id}", map_indexes=index, key=key)

    report = []
    for index, run in enumerate(runs):
        model = run["model"]
        synced, published = pull("sync", index), pull("publish", index)
        entry: dict[str, Any] = {"model": model, "version": (synced or {}).get("version")}
        failed = next((s for s in steps if states.get((s, index)) == "failed"), None)
        upstream_failed = next((s for s in steps if states.get((s, index)) == "upstream_failed"), None)
        if failed:
            failure = pull(failed, index, FAILURE_XCOM_KEY) or {}
            entry.update(outcome="failed", failed_step=failed,
                         reason=failure.get("error") or f"task {failed} failed; see its log")
        elif upstream_failed:
            entry.update(outcome="failed", failed_step=upstream_failed, reason="an upstream task failed")
        elif published:
            entry.update(outcome="re-validated, already published" if published.get("already_published")
                         else "published", manifest_uri=published.get("manifest_uri"),
                         selected_variant=published.get("selected_variant"))
        elif synced and synced.get("published"):
            entry.update(outcome="up to date (nothing new)")
        else:
            entry.update(outcome="not finished", states={s: states.get((s, index)) for s in steps})
        report.append(entry)
    for e in report:
        detail = e.get("reason") or e.get("manifest_uri") or ""
        log.info("%-24s %-10s %-34s %s", e["model"], e.get("version") or "-", e["outcome"], detail)
    failed_models = [e["model"] for e in report if e["outcome"] == "failed"]
    if failed_models:
        # Raised after the report is written: the run is marked failed (CI and alerts see it), the others'
        # results stay published.
        context["ti"].xcom_push(key="report", value=report)
        others = [f"{e['model']}: {e['outcome']}" for e in report if e["model"] not in failed_models]
        raise AirflowFailException(f"export failed for {failed_models}"
                                   + (f"; the others: {', '.join(others)}" if others else ""))
    return report
