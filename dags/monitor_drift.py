"""
### monitor_drift

Judges what the service received since the last report against the champion's training run
(Evidently tests, performance estimates, feedback labels, refusals), writes reports, alerts
on-call people and, when the verdict is critical drift or a performance drop, asks `train_model`
to retrain.

* **Runs** hourly, or manually (the form can set where the window starts and mute the alert).
* **Current data**: the prediction log since the last report. Fewer than `MEDOPS_DRIFT_MIN_ROWS`
  rows (200) is `insufficient_data`: no report, no alert, and the rows stay for the next window.
* **Reference**: the champion's training rows, restored from its data version (`data-vN`) and
  scored by the champion for prediction drift.
* **Signals** (window and each `site_id` with enough rows): drift of `probability_malignant`,
  importance-weighted feature drift, strong drift of a top feature, the plain column-count rule,
  estimated sensitivity (CBPE, calibrated on the champion's hold-out rows), realized sensitivity
  from `/feedback` labels, and each site's share of refused (422) records.
* **Verdict**: `no_drift`, `drift`, `performance_drop`, `data_quality` or `insufficient_data`,
  with a severity (`warning`, `critical`); see `monitoring/judge.py`.
* **Reports**: `MEDOPS_HOME/reports/<timestamp>/`, the Evidently UI project named after the model,
  and the champion's MLflow run (`monitoring/<timestamp>/`); the run's note links the report.
* **Alert** on `drift`, `performance_drop` and `data_quality` (webhook + e-mail, deduplicated). One
  no channel delivered waits in `MEDOPS_HOME/alerts/outbox/` (`medops alerts`), and
  `alert_on_call` fails when configured channels failed.
* **Retraining**: `drift` or `performance_drop` at `critical` emits the `medops/drift` Asset, which
  schedules `train_model` (with cooldown). `data_quality` never retrains; warnings only alert.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task

from medops.orchestration import DEFAULT_ARGS, DRIFT


@dag(
    dag_id="monitor_drift",
    schedule="@hourly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,  # owner, retries, and monitoring's failure notifier
    tags=["medops", "monitoring"],
    doc_md=__doc__,
    params={
        "since": Param(
            None,
            type=["null", "string"],
            format="date-time",
            description="Time the window starts at (UTC). Blank: where the last report's window ended.",
        ),
        "alert": Param(True, type="boolean", description="Alert on-call people when there is drift."),
    },
)
def monitor_drift():
    @task
    def check_drift() -> dict:
        """Signals and verdict of the prediction-log window vs the champion's training run; reports written."""
        from medops.app.run_notes import summary
        from medops.core.settings import get_settings
        from monitoring.reports import run_monitoring

        since = get_current_context()["params"].get("since") or None
        result = run_monitoring(get_settings(), since=datetime.fromisoformat(since) if since else None, alert=False)
        severity = f" {result.severity}" if result.severity else ""
        print(f"verdict: {result.verdict}{severity} ({result.n_current} rows) {result.note}".strip())
        for signal in result.signals:
            print(f"  {signal['scope']}: {signal['text']}")
        summary(
            f"verdict {result.verdict}{severity} on {result.n_current} predictions",
            {"report": result.report_url or result.report},
            "alert_on_call tells on-call people; retraining via medops/drift" if result.retrain else None,
        )
        return result.to_dict()

    @task
    def alert_on_call(result: dict) -> dict | None:
        """Alert on drift, performance_drop and data_quality; note the verdict on the run; fail when every
        configured channel failed."""
        from airflow.sdk.exceptions import AirflowFailException

        from medops.app.run_notes import alert_delivery, monitoring_note, note_run, summary
        from medops.core.settings import get_settings
        from monitoring.reports import alert_for_result

        settings, context = get_settings(), get_current_context()
        outcome = alert_for_result(result, settings) if context["params"].get("alert", True) else None
        note_run("monitor_drift", context["run_id"], monitoring_note(result, outcome, settings), settings)
        summary(f"alert: {alert_delivery(outcome)}", {"outbox": (outcome or {}).get("outbox")})
        failed = [name for name, state in (outcome or {}).get("channels", {}).items() if state.startswith("failed")]
        if outcome and outcome.get("outbox") and failed:
            raise AirflowFailException(f"alert not delivered ({', '.join(failed)} failed); kept in {outcome['outbox']}")
        return outcome

    @task.short_circuit
    def drifted(result: dict) -> bool:
        """Go on to announce drift only when the verdict asks for retraining (critical drift or performance drop)."""
        return bool(result.get("retrain"))

    @task(outlets=[DRIFT])
    def announce_drift(result: dict) -> None:
        """Emit medops/drift with the verdict, severity, columns, sites, signals and report link."""
        from monitoring.reports import MonitoringResult

        extra = MonitoringResult(**result).asset_extra()
        get_current_context()["outlet_events"][DRIFT].extra = extra

    result = check_drift()
    alert_on_call(result)
    drifted(result) >> announce_drift(result)


monitor_drift()
