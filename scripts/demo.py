"""`make demo`: a real nightly export on this machine, no cloud, no cluster.

1. S3 on loopback (moto's server), restored from `.demo/s3/` when an earlier demo left it there;
2. on first use, what training would have left: DigitsCNN trained on scikit-learn's digits for a few seconds,
   its safetensors checkpoint under s3://train-bucket/digits-cnn/<step>/ with a `_COMPLETE` marker, and the
   evaluation / calibration sets (cached under `.demo/seed/`, so every run sees the same bytes);
3. an isolated Airflow (`.demo/airflow`, SQLite), the `aws_default` connection pointing at that S3, the local
   runtime, and `model_export_nightly` run end to end with `dag.test()`;
4. a summary (what was exported, parity and accuracy, speed-ups, the selected variant, where the manifest is);
5. the S3 contents saved back to `.demo/s3/`: the next `make demo` finds its version published and says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / ".demo"
AIRFLOW_HOME = DEMO / "airflow"
S3_MIRROR = DEMO / "s3"
SEED_CACHE = DEMO / "seed"
CONFIG_PATH = REPO / "include" / "config" / "export.yaml"
DAG_ID = "model_export_nightly"
CHECKPOINT_STEP = 100

for p in (REPO / "include", REPO / "plugins", REPO):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def say(msg: str) -> None:
    print(f">>> {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_environment(endpoint: str) -> None:
    """Before Airflow is imported: it reads its configuration once."""
    AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("DEMO_LOG_LEVEL", "WARNING"),
        # No DAG schedules on the per-model assets yet (the staging deploy will): Airflow warns when the first event
        # creates one. dag.test() warns once a second while skipped tasks cascade. The summary says what happened.
        "AIRFLOW__LOGGING__NAMESPACE_LEVELS": "airflow.assets.manager=ERROR airflow.sdk.definitions.dag=ERROR",
        "EXPORT_RUNTIME": "local",
        "EXPORT_CONFIG": str(CONFIG_PATH),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "include"), os.environ.get("PYTHONPATH")])),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({
            "conn_type": "aws", "login": "testing", "password": "testing",
            "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"}}),
    })
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(k, None)


# ------------------------------------------------------------------------------------------------ seeding
def cached(name: str, make) -> bytes:
    path = SEED_CACHE / name
    if not path.is_file():
        SEED_CACHE.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make())
    return path.read_bytes()


def seed_training_outputs(client, config, *, verbose: bool) -> None:
    """What the training jobs would have written, for every configured model the demo knows how to train.

    Written on every run from the cache (the same bytes each time, so the same versions): a restored S3 always
    holds checkpoints that fit the current config.
    """
    from scripts.seeding import digits_files, encoder_checkpoint, put_checkpoint, put_uri

    for spec in config.models:
        if spec.factory == "model_zoo.digits:DigitsCNN":
            if not (SEED_CACHE / "digits-cnn.safetensors").is_file():
                say("training DigitsCNN on scikit-learn's digits (a few seconds) ...")
                files = digits_files()
                say(f"trained: held-out top-1 accuracy {files['accuracy']:.3f}")
                SEED_CACHE.mkdir(parents=True, exist_ok=True)
                for name, key in (("digits-cnn.safetensors", "checkpoint"), ("digits-eval.npz", "eval"),
                                  ("digits-calib.npz", "calib")):
                    (SEED_CACHE / name).write_bytes(files[key])
            body = cached("digits-cnn.safetensors", bytes)
            if spec.accuracy.eval_data:
                put_uri(client, spec.accuracy.eval_data, cached("digits-eval.npz", bytes))
            if spec.calibration.data.startswith("s3://"):
                put_uri(client, spec.calibration.data, cached("digits-calib.npz", bytes))
        elif spec.factory == "model_zoo.encoder:TinyEncoder":
            kwargs = json.dumps(spec.factory_kwargs, sort_keys=True)
            key = hashlib.sha256(kwargs.encode()).hexdigest()[:12]  # another architecture, another checkpoint
            body = cached(f"{spec.name}-{key}.safetensors", lambda spec=spec: encoder_checkpoint(**spec.factory_kwargs))
        else:
            say(f"skipping {spec.name}: the demo only knows how to make checkpoints for the sample models")
            continue
        folder = put_checkpoint(client, spec.checkpoint.uri, CHECKPOINT_STEP, {spec.checkpoint.filename: body})
        if verbose:
            say(f"seeded {spec.name} checkpoint at {folder}")


# ------------------------------------------------------------------------------------------------ Airflow
def prepare_airflow(config) -> None:
    from airflow.models.pool import Pool
    from airflow.utils import db

    quiet_logs()
    if not (AIRFLOW_HOME / "airflow.db").is_file():
        say("creating the Airflow metadata database (.demo/airflow/airflow.db) ...")
        db.resetdb()
    Pool.create_or_update_pool(name=config.pipeline.gpu_pool, slots=config.pipeline.gpu_pool_slots,
                               description="concurrent GPU export steps", include_deferred=False)


def quiet_logs() -> None:
    # Third-party deprecation notices are not the demo's story (Airflow routes warnings into its log).
    warnings.simplefilter("ignore")
    # dag.test() polls once a second and warns "No tasks to run" while the mapped group waits on a running task.
    logging.getLogger("airflow.sdk.definitions.dag").setLevel(logging.ERROR)


def run_dag() -> tuple[Any, list[dict[str, Any]]]:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    quiet_logs()
    bag = DagBag(dag_folder=str(REPO / "dags" / f"{DAG_ID}.py"))
    if bag.import_errors:
        raise SystemExit(f"DAG import errors: {bag.import_errors}")
    dag_run = bag.dags[DAG_ID].test()
    with create_session() as session:
        rows = session.scalars(select(XComModel).where(
            XComModel.dag_id == DAG_ID, XComModel.run_id == dag_run.run_id, XComModel.task_id == "summary",
            XComModel.key.in_(["return_value", "report"]))).all()
        report = next((XComModel.deserialize_value(r) for r in rows), [])
    return dag_run, report


# ------------------------------------------------------------------------------------------------ summary
def _fmt(x: Any, spec: str = ".3g") -> str:
    return format(x, spec) if isinstance(x, int | float) else "-"


def describe(client, config, entry: dict[str, Any]) -> list[str]:
    from export_lib.storage.store import Store, get_manifest

    lines = [f"{entry['model']}: {entry['outcome']}" + (f" (version {entry['version']})" if entry.get("version")
                                                           else "")]
    if entry["outcome"] == "failed":
        return [*lines, f"    failed at {entry.get('failed_step')}: {entry.get('reason')}"]
    if not entry.get("version"):
        return lines
    store = Store.from_config(config)
    manifest = get_manifest(client, store, entry["model"], entry["version"])
    lines += manifest_lines(manifest)
    lines.append(f"    manifest: {store.uri(store.key(entry['model'], entry['version'], 'manifest.json'))}")
    workdir = REPO / config.pipeline.workspace / entry["model"] / entry["version"]
    if (workdir / "reports").is_dir():
        lines.append(f"    reports:  {workdir / 'reports'}/")
    return lines


def manifest_lines(manifest: dict[str, Any]) -> list[str]:
    validation = manifest.get("validation") or {}
    accuracy = validation.get("accuracy") or {}
    values = accuracy.get("values") or {}
    lines = []
    if accuracy:
        source = "held-out" if accuracy.get("data") == "eval" else "generated"
        lines.append(f"    accuracy ({accuracy.get('metric')} on {accuracy.get('samples')} {source} samples, threshold "
                     f"{_fmt(accuracy.get('threshold'), '.2f')}): torch eager {_fmt(values.get('torch-eager'), '.3f')}")
    for variant, v in (validation.get("variants") or {}).items():
        outputs = v.get("outputs") or {}
        worst = max((o.get("max_abs_err") or 0.0 for o in outputs.values()), default=None)
        lines.append(f"      {variant:<13} {'passed' if v.get('passed') else 'FAILED':<6}  parity max |err| "
                     f"{_fmt(worst)}  {accuracy.get('metric', 'accuracy')} {_fmt(values.get(variant), '.3f')}")
    ratios = (manifest.get("benchmark") or {}).get("ratios") or {}
    if ratios:
        lines.append("    speed-ups (p50 latency):")
    for variant, by_batch in ratios.items():
        parts = []
        for batch, r in by_batch.items():
            part = f"batch {batch}: {_fmt(r.get('speedup_vs_eager'), '.2f')}x torch eager"
            if r.get("fp_counterpart"):
                part += f", {_fmt(r.get('speedup_vs_fp'), '.2f')}x {r['fp_counterpart']}"
            parts.append(part)
        lines.append(f"      {variant:<13} " + "; ".join(parts))
    selection = manifest.get("selection") or {}
    lines.append(f"    selected: {manifest.get('selected_variant')}")
    for variant, d in (selection.get("decisions") or {}).items():
        lines.append(f"      {variant:<13} {d.get('reason')}")
    return lines


def main() -> int:
    started = time.monotonic()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    set_environment(endpoint)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import boto3

        from export_lib.config import load_config
        from scripts.seeding import ensure_bucket, mirror_down, mirror_up

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        config = load_config(CONFIG_PATH)
        say(f"S3 (moto) at {endpoint}")
        restored = mirror_up(client, S3_MIRROR)
        if restored:
            say(f"restored {restored} objects of the earlier demo from .demo/s3/")
        seed_training_outputs(client, config, verbose=not restored)
        ensure_bucket(client, config.pipeline.export_bucket)

        prepare_airflow(config)
        say(f"running {DAG_ID} with dag.test() (local runtime) ...")
        t0 = time.monotonic()
        dag_run, report = run_dag()
        dag_seconds = time.monotonic() - t0

        buckets = [b["Name"] for b in client.list_buckets()["Buckets"]]
        saved = sum(mirror_down(client, b, S3_MIRROR) for b in buckets)

        print()
        say(f"{DAG_ID} run {dag_run.run_id}: {dag_run.state} in {dag_seconds:.1f} s")
        for entry in report:
            for line in describe(client, config, entry):
                print(line)
        if report and all(e["outcome"].startswith("up to date") for e in report):
            say("nothing new: every model's newest checkpoint is already exported and published")
        say(f"S3 contents saved to .demo/s3/ ({saved} objects); total {time.monotonic() - started:.1f} s")
        return 0 if str(dag_run.state) == "success" else 1
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
