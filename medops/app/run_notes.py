"""Notes on Airflow runs: a run's outcome (refused challenger, approval waiting, rollout fallen back,
alert not delivered) where people look first, the grid, with the reason, figures and links.

Airflow 3.3's Task SDK lets a task read its run's note but not write it, so :func:`note_run` writes
it through the REST API; a note that cannot be written is a WARNING, never a failed task.
"""

from __future__ import annotations

import logging

from medops.core.settings import Settings

log = logging.getLogger(__name__)

NOTE_LIMIT = 1000  # Airflow's DAGRunPatchBody caps notes at 1,000 characters


def note_run(dag_id: str, run_id: str, markdown: str, settings: Settings) -> bool:
    """Set the run's note (Markdown, cut at Airflow's limit); True when Airflow took it."""
    from medops.app.airflow_api import AirflowClient, AirflowError, admin_password
    from medops.core.links import airflow_url

    password = admin_password(settings)
    if password is None:  # dag.test() in a test: no API server to write to, the log says it all
        log.info("run note (no Airflow API server to write it to):\n%s", markdown)
        return False
    note = markdown if len(markdown) <= NOTE_LIMIT else markdown[: NOTE_LIMIT - 1] + "…"
    try:
        with AirflowClient(airflow_url(settings), password=password, timeout=10) as client:
            client.set_note(dag_id, run_id, note)
    except (AirflowError, OSError) as error:
        log.warning("could not set the note of %s/%s: %s\n%s", dag_id, run_id, error, markdown)
        return False
    print(f"run note:\n{note}")
    return True


def summary(did: str, look: dict[str, str | None] | None = None, next_step: str | None = None) -> None:
    """The last lines of a task log, printed as one block: what the task did, where to look and what
    happens next."""
    lines = [f"── summary: {did}"]
    lines += [f"   {label}: {where}" for label, where in (look or {}).items() if where]
    if next_step:
        lines.append(f"   next: {next_step}")
    print("\n".join(lines))


def monitoring_note(result: dict, alert: dict | None, settings: Settings) -> str:
    """monitor_drift's outcome: verdict, where the alert went and the report first (what on-call
    people look for, and what the UI's note editor shows without scrolling), then the figures."""
    verdict = result.get("verdict", "unknown")
    lines = [f"**{verdict}** on {result.get('n_current', 0)} predictions of model v{result.get('model_version')}"]
    lines.append(f"- alert: {alert_delivery(alert)}")
    if report := result.get("report_url") or result.get("report"):
        lines.append(f"- [Evidently report]({report})")
    if result.get("severity"):
        retraining = "retraining requested (medops/drift)" if result.get("retrain") else "no retraining"
        lines.append(f"- severity: {result['severity']}; {retraining}")
    if result.get("sites"):
        lines.append(f"- sites: {', '.join(result['sites'])}")
    lines += [f"- {signal['scope']}: {signal['text']}" for signal in (result.get("signals") or [])[:8]]
    if columns := result.get("drifted_columns") or []:
        shown = ", ".join(columns[:8]) + (f" (+{len(columns) - 8} more)" if len(columns) > 8 else "")
        lines.append(f"- drifted features ({len(columns)}): {shown}")
    if result.get("note"):
        lines.append(f"- {result['note']}")
    return "\n".join(lines)


def alert_delivery(alert: dict | None) -> str:
    """One phrase for what happened to an alert (an :class:`~medops.core.alerts.AlertOutcome` as a dict)."""
    if alert is None:
        return "none (no drift, or muted)"
    if alert.get("sent"):
        return "sent (" + ", ".join(k for k, v in alert["channels"].items() if v == "sent") + ")"
    if alert.get("deduplicated"):
        return "already sent within the deduplication window"
    channels = alert.get("channels") or {}
    if all(state == "not configured" for state in channels.values()):
        why = "no channel configured (MEDOPS_ALERT_WEBHOOK_URL or MEDOPS_SMTP_HOST + MEDOPS_ALERT_EMAIL_TO)"
    else:
        why = "; ".join(f"{k} {v}" for k, v in channels.items() if v != "not configured")
    return f"**NOT DELIVERED**: {why}; waiting in `{alert.get('outbox')}` (`medops alerts`)"


def training_note(result: dict, settings: Settings) -> str:
    """train_model's outcome for a registered version: refused, waiting for approval, or promoted."""
    from medops.core.links import mlflow_model_version, mlflow_run
    from pipelines import model_registry

    version, run_id = result["model_version"], result["mlflow_run_id"]
    run = model_registry.client(settings).get_run(run_id)
    if result.get("promoted"):
        by = f", approved by {result['approved_by']}" if result.get("approved_by") else ""
        head = f"**v{version} promoted to @champion**{by}: deploy_model rolls it out"
    elif not result["gate_passed"]:
        head = f"**Challenger v{version} REFUSED by the gate**: @champion unchanged"
    elif result.get("needs_approval"):
        head = f"**v{version} passed the gate: WAITING FOR APPROVAL** in Required actions"
    else:
        head = f"v{version} passed the gate: promoting"
    metrics = run.data.metrics
    figures = ", ".join(
        f"{label} {metrics[name]:.3f}"
        for name, label in (("roc_auc", "ROC AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"))
        if name in metrics
    )
    lines = [head, f"- hold-out: {figures} (trigger: {result.get('trigger')})"]
    lines += [f"- {reason}" for reason in result.get("reasons", [])[:4]]
    lines.append(
        f"- [MLflow model version {version}]({mlflow_model_version(settings, settings.model_name, version)})"
        f" · [MLflow run]({mlflow_run(settings, run.info.experiment_id, run_id)})"
    )
    return "\n".join(lines)


def rollout_note(version: str, error: BaseException, settings: Settings) -> str:
    """deploy_model's fallback: the old version keeps serving, and why the new one was refused."""
    from medops.core.links import mlflow_model_version

    first_line = (str(error).strip().splitlines() or [""])[0][:400]
    return (
        f"**Rollout of v{version} FELL BACK**: the previous version keeps serving\n"
        f"- reason: {type(error).__name__}: {first_line}\n"
        f"- [MLflow model version {version}]({mlflow_model_version(settings, settings.model_name, version)})"
    )
