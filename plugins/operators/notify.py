"""Failure notifier: one line naming model, step and reason in the task log, and optionally a chat webhook.

Webhook URL (Slack / Mattermost / Teams incoming-webhook style, JSON `{"text": ...}`): Airflow Variable
`export_alert_webhook`, else env `EXPORT_ALERT_WEBHOOK`; none configured = log only. A webhook that cannot be
reached is logged, never raised: an alert must not hide the failure it reports.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

from airflow.sdk import BaseNotifier, Variable


def failure_message(context: dict[str, Any]) -> str:
    ti, task = context["ti"], context.get("task")
    model = getattr(task, "model", None)
    step = getattr(task, "step", None) or ti.task_id
    reason = context.get("exception") or "unknown (see the task log)"
    where = f"model '{model}' step '{step}'" if model else f"task '{ti.task_id}'"
    return (f"model export FAILED: {where} in {ti.dag_id} run {ti.run_id} "
            f"(map index {ti.map_index}, try {ti.try_number}): {reason}")


class ExportFailureNotifier(BaseNotifier):
    """`on_failure_callback` of every task of the export DAGs."""

    def __init__(self, webhook_url: str | None = None, timeout_s: float = 10.0):
        super().__init__()
        self.webhook_url = webhook_url
        self.timeout_s = timeout_s

    def _webhook(self) -> str | None:
        return (self.webhook_url or Variable.get("export_alert_webhook", default=None)
                or os.environ.get("EXPORT_ALERT_WEBHOOK") or None)

    def notify(self, context: dict[str, Any]) -> None:
        message = failure_message(context)
        self.log.error("%s", message)
        url = self._webhook()
        if not url:
            return
        request = urllib.request.Request(url, data=json.dumps({"text": message}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                self.log.info("failure alert sent to the webhook (HTTP %s)", response.status)
        except OSError as e:
            self.log.warning("could not send the failure alert to the webhook: %s", e)
