"""What every medops DAG shares: owner, retries, and an alert when a task fails for good."""

from __future__ import annotations

from datetime import timedelta
from typing import Any


def alert_on_failure(context: dict[str, Any]) -> None:
    """Send a failed task to the on-call channels (webhook, e-mail) configured in settings."""
    try:
        from monitoring.alerts import notify_task_failure
    except ImportError:  # monitoring not installed: the failure still shows in the Airflow UI
        return
    notify_task_failure(context)


DEFAULT_ARGS: dict[str, Any] = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(seconds=20),
    "on_failure_callback": alert_on_failure,
}
