"""The one module outside ``dags/`` that imports Airflow: what every medops DAG shares.

The Assets that chain the loop, with :class:`LandingTrigger` (run in Airflow's triggerer) turning a
file landing in ``MEDOPS_HOME/landing/`` into an ``ingest_data`` run, and :data:`DEFAULT_ARGS`,
whose :class:`MedopsNotifier` sends a task that failed for good to the on-call channels. Only light
modules are imported at the top: DAG files import this one when they are parsed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, AssetAlias, AssetWatcher, BaseNotifier
from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from medops.core import assets
from medops.core.alerts import AlertOutcome, send_alert

log = logging.getLogger(__name__)


class LandingTrigger(BaseEventTrigger):
    """Fire when complete files wait in ``MEDOPS_HOME/landing`` that no ingest has claimed yet."""

    def __init__(self, poke_interval: float = 3.0) -> None:
        super().__init__()
        self.poke_interval = poke_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return "medops.orchestration.LandingTrigger", {"poke_interval": self.poke_interval}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from medops.core.settings import get_settings
        from pipelines.ingest import CLAIMED, landing_files

        settings = get_settings()
        claimed_dir = settings.landing_dir / CLAIMED
        sizes: dict[str, int] = {}
        while True:
            ready = []
            for path in landing_files(settings):
                key = str(path.relative_to(settings.landing_dir)).replace("/", "__")
                size = path.stat().st_size
                if (claimed_dir / key).exists():
                    continue
                if sizes.get(key) == size:  # complete: it stopped growing between two polls
                    ready.append(key)
                sizes[key] = size
            if ready:
                claimed_dir.mkdir(parents=True, exist_ok=True)
                for key in ready:
                    (claimed_dir / key).write_text(str(sizes[key]))
                self.log.info("landing: %d file(s) ready: %s", len(ready), ", ".join(ready))
                yield TriggerEvent({"files": ready})
                return
            await asyncio.sleep(self.poke_interval)


class MedopsNotifier(BaseNotifier):
    """Sends a failed task (or DAG run) to the medops alert channels (``on_failure_callback``)."""

    template_fields = ("severity",)

    def __init__(self, severity: str = "error"):
        super().__init__()
        self.severity = severity

    def notify(self, context: Any) -> None:
        notify_task_failure(context, severity=self.severity)


def notify_task_failure(context: Any, *, severity: str = "error") -> AlertOutcome:
    """Alert that a task (or, in a DAG-level callback, a DAG run) failed; reads what the context has."""
    try:
        ti = context.get("ti") or context.get("task_instance")
        dag_id = getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", None) or "unknown DAG"
        task_id = getattr(ti, "task_id", None)
        run_id = getattr(ti, "run_id", None) or context.get("run_id") or getattr(context.get("dag_run"), "run_id", None)
        error = context.get("exception") or context.get("reason")
        title = f"{dag_id}.{task_id} failed" if task_id else f"{dag_id} failed"
        details = None
        if error:
            first_line = (str(error).strip().splitlines() or [""])[0][:500]
            details = f"Reason: {first_line}" if isinstance(error, str) else f"{type(error).__name__}: {first_line}"
        log.info("alerting on failure of %s (run %s)", title, run_id)
        try:
            url = getattr(ti, "log_url", None) if ti is not None else None
        except Exception:  # log_url reads Airflow's config; a missing one must not stop the alert
            url = None
        # The run id is in the log link, not the text: the same failure every hour is one alert per window.
        return send_alert(title, "failure", [], None, url, severity=severity, details=details)
    except Exception as error:
        log.exception("failure alert could not be built: %s", error)
        return AlertOutcome(sent=False, channels={"error": f"failed: {error}"})


LANDING = Asset(
    assets.LANDING,
    watchers=[AssetWatcher(name="medops_landing_folder", trigger=LandingTrigger())],
    extra={"doc": "Files a hospital dropped into MEDOPS_HOME/landing/."},
)
DATA = Asset(assets.DATA, extra={"doc": "A new data version was tagged in the data registry."})
CHAMPION = Asset(assets.CHAMPION, extra={"doc": "A model version was promoted to @champion."})
DRIFT = Asset(assets.DRIFT, extra={"doc": "monitor_drift saw drift in what the service receives."})
# A task that only sometimes makes a data version declares this alias, not DATA itself: an alias
# emits an event only for the assets the task adds, while a declared Asset emits one on every success.
NEW_DATA = AssetAlias("medops-new-data-version")

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(seconds=20),
    "on_failure_callback": MedopsNotifier(),
}


def actor_of(context: Any) -> str:
    """Who a DAG run acts for in the audit trail: the Airflow user who triggered it (from the UI or
    the REST API), else the scheduler (a run scheduled by an Asset or a timetable)."""
    from pipelines.governance import SCHEDULER

    name = getattr(context.get("dag_run"), "triggering_user_name", None)
    return str(name).strip() if name and str(name).strip() else SCHEDULER


def approver_of(response: Any) -> str:
    """The Airflow user name of the person who approved, from ``ApprovalOperator``'s result (its XCom).

    Anything but an "Approve" by a named user (``responded_by_user`` is None when the request timed
    out to a default) is refused: a promotion reserved for a person never goes through on a placeholder.
    """
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    from medops.core.audit import PLACEHOLDER_ACTORS

    if not isinstance(response, dict) or not response:
        raise PermissionError("no approval response recorded in Required actions: not promoting")
    chosen = list(response.get("chosen_options") or [])
    if chosen != [ApprovalOperator.APPROVE]:
        answer = chosen or "with nothing"
        raise PermissionError(f"the approval request was answered {answer}, not Approve: not promoting")
    user = response.get("responded_by_user") or {}
    name = str(user.get("name") or "").strip() if isinstance(user, dict) else ""
    if name.lower() in PLACEHOLDER_ACTORS:
        raise PermissionError("the approval names no Airflow user (timed out to a default?): not promoting")
    return name
