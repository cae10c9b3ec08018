"""What every medops DAG shares: owner, retries, and an alert when a task fails for good.

The alert is monitoring's Airflow notifier, so task failures reach the same on-call channels
(Slack-shaped webhook, e-mail) as drift. Its module imports only the stdlib and ``airflow.sdk``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from monitoring.alerts import failure_notifier

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(seconds=20),
    "on_failure_callback": failure_notifier(),
}
