"""Trigger `model_export_nightly` over Airflow's REST API v2 and wait for the result (the CI entry point).

    python scripts/trigger_export.py --url https://airflow.example.com --model digits-cnn \\
        --checkpoint-uri s3://train-bucket/digits-cnn/000200/

Credentials: --token / $AIRFLOW_TOKEN (a JWT), or --username/--password ($AIRFLOW_USERNAME / $AIRFLOW_PASSWORD)
exchanged for one at POST /auth/token. Unpauses the DAG, triggers a run with
conf {models, force, variants, checkpoint_uri}, polls until the run ends, prints every task's state and the run's
per-model summary. Exit status: 0 the run succeeded, 1 it failed, 2 bad usage / unreachable API / timeout.
Only needs `apache-airflow-client` (no Airflow installation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TERMINAL = {"success", "failed"}


class UsageError(Exception):
    """Bad arguments, credentials or an unreachable API: exit 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("AIRFLOW_URL"),
                   help="Airflow API server base URL, e.g. http://localhost:8080 ($AIRFLOW_URL)")
    p.add_argument("--token", default=os.environ.get("AIRFLOW_TOKEN"), help="JWT access token ($AIRFLOW_TOKEN)")
    p.add_argument("--username", default=os.environ.get("AIRFLOW_USERNAME"), help="($AIRFLOW_USERNAME)")
    p.add_argument("--password", default=os.environ.get("AIRFLOW_PASSWORD"), help="($AIRFLOW_PASSWORD)")
    p.add_argument("--dag-id", default="model_export_nightly")
    p.add_argument("--model", dest="models", action="append", default=[],
                   help="model to export (repeat for several; default: every configured model)")
    p.add_argument("--variant", dest="variants", action="append", default=[],
                   help="restrict to this variant (repeat for several; default: each model's configured ones)")
    p.add_argument("--checkpoint-uri", default=None, help="pin one checkpoint folder (needs exactly one --model)")
    p.add_argument("--force", action="store_true", help="re-run every step even if the version is published")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the run (default 3600)")
    p.add_argument("--poll", type=float, default=10, help="seconds between status checks (default 10)")
    p.add_argument("--no-wait", action="store_true", help="print the run id and exit 0 after triggering")
    args = p.parse_args(argv)
    if not args.url:
        p.error("--url (or $AIRFLOW_URL) is required")
    if not args.token and not (args.username and args.password):
        p.error("give --token, or --username and --password (or their environment variables)")
    if args.checkpoint_uri and len(args.models) != 1:
        p.error("--checkpoint-uri pins one checkpoint: give exactly one --model")
    if args.checkpoint_uri and not args.checkpoint_uri.startswith(("s3://", "/")):
        p.error("--checkpoint-uri must be an s3:// folder URI (or an absolute path the workers can read)")
    return args


def fetch_token(url: str, username: str, password: str) -> str:
    """POST /auth/token (the auth manager's endpoint, outside /api/v2, so not in the generated client)."""
    request = urllib.request.Request(
        f"{url.rstrip('/')}/auth/token", method="POST",
        data=json.dumps({"username": username, "password": password}).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["access_token"]
    except urllib.error.HTTPError as e:
        raise UsageError(f"POST {url}/auth/token: HTTP {e.code} {e.read()[:300]!r}: check the credentials") from e
    except (urllib.error.URLError, OSError) as e:
        raise UsageError(f"cannot reach the Airflow API at {url}: {e}") from e


def run_conf(args: argparse.Namespace) -> dict[str, Any]:
    return {"models": args.models, "force": args.force, "variants": args.variants,
            "checkpoint_uri": args.checkpoint_uri}


def task_states(api, dag_id: str, run_id: str) -> list[tuple[str, str, str]]:
    from airflow_client.client.api.task_instance_api import TaskInstanceApi

    result = TaskInstanceApi(api).get_task_instances(dag_id, run_id, limit=1000)
    rows = []
    for ti in sorted(result.task_instances, key=lambda t: (t.start_date is None, t.start_date or 0, t.task_id)):
        label = ti.task_id + (f"[{ti.rendered_map_index or ti.map_index}]" if ti.map_index >= 0 else "")
        state = ti.state.value if ti.state is not None else "none"
        rows.append((label, state, f"{ti.duration:.1f}s" if ti.duration is not None else ""))
    return rows


def run_summary(api, dag_id: str, run_id: str) -> list[dict[str, Any]] | None:
    """The `summary` task's per-model report (return value, or the `report` XCom when models failed)."""
    from airflow_client.client.api.x_com_api import XComApi
    from airflow_client.client.exceptions import NotFoundException

    for key in ("return_value", "report"):
        try:
            entry = XComApi(api).get_xcom_entry(dag_id, "summary", run_id, key, deserialize=True)
        except NotFoundException:
            continue
        value = entry.actual_instance.value  # anyOf wrapper: XComResponseNative with deserialize=True
        return json.loads(value) if isinstance(value, str) else value
    return None


def trigger_and_wait(args: argparse.Namespace) -> int:
    from airflow_client.client import ApiClient, Configuration
    from airflow_client.client.api.dag_api import DAGApi
    from airflow_client.client.api.dag_run_api import DagRunApi
    from airflow_client.client.exceptions import ApiException, NotFoundException
    from airflow_client.client.models.dag_patch_body import DAGPatchBody
    from airflow_client.client.models.trigger_dag_run_post_body import TriggerDAGRunPostBody

    url = args.url.rstrip("/")
    token = args.token or fetch_token(url, args.username, args.password)
    with ApiClient(Configuration(host=url, access_token=token)) as api:
        try:
            if DAGApi(api).get_dag(args.dag_id).is_paused:
                DAGApi(api).patch_dag(args.dag_id, DAGPatchBody(is_paused=False))
                print(f"unpaused {args.dag_id}", flush=True)
            run = DagRunApi(api).trigger_dag_run(
                args.dag_id, TriggerDAGRunPostBody(logical_date=None, conf=run_conf(args)))
        except NotFoundException as e:
            raise UsageError(f"DAG '{args.dag_id}' not found at {url} (is it parsed? check import errors)") from e
        except ApiException as e:
            raise UsageError(f"triggering {args.dag_id} failed: HTTP {e.status} {e.body}") from e
        run_id = run.dag_run_id
        print(f"triggered {args.dag_id} run {run_id} with conf {json.dumps(run_conf(args))}", flush=True)
        if args.no_wait:
            return EXIT_OK
        deadline, state = time.monotonic() + args.timeout, None
        while True:
            current = DagRunApi(api).get_dag_run(args.dag_id, run_id).state.value
            if current != state:
                print(f"  run state: {current}", flush=True)
                state = current
            if state in TERMINAL:
                break
            if time.monotonic() > deadline:
                print(f"timed out after {args.timeout:.0f} s waiting for run {run_id} (state {state})",
                      file=sys.stderr)
                print_tasks(api, args.dag_id, run_id)
                return EXIT_USAGE
            time.sleep(args.poll)
        print_tasks(api, args.dag_id, run_id)
        report = run_summary(api, args.dag_id, run_id)
        if report:
            print("per model:")
            for entry in report:
                detail = entry.get("reason") or entry.get("manifest_uri") or ""
                print(f"  {entry['model']:<24} {entry.get('version') or '-':<18} {entry['outcome']}  {detail}")
        print(f"{args.dag_id} run {run_id}: {state}")
        return EXIT_OK if state == "success" else EXIT_FAILED


def print_tasks(api, dag_id: str, run_id: str) -> None:
    print("tasks:")
    for label, state, duration in task_states(api, dag_id, run_id):
        print(f"  {label:<40} {state:<16} {duration}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help is 0, bad usage is 2
        return int(e.code or 0)
    import urllib3

    try:
        return trigger_and_wait(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (urllib3.exceptions.HTTPError, OSError) as e:  # the API went away while we waited
        print(f"error: lost the Airflow API at {args.url}: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
