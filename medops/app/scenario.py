"""The drift scenario `make run` offers: a hospital's traffic shifts and the platform renews itself.

Drifted traffic with feedback -> `monitor_drift` -> the alert -> `train_model` -> `deploy_model` ->
the new champion serving, each stage printed as it completes.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rich.console import Console

from medops.app.run_notes import alert_delivery
from medops.core import links
from medops.core.processes import wait_until
from medops.core.settings import Settings

if TYPE_CHECKING:
    from airflow_client.client.models import DAGRunResponse


class NotRenewed(RuntimeError):
    """The loop ran but the model serving at the end is the one serving at the start."""


def _not_renewed(console: Console, before: str, what: str, next_step: str) -> str:
    console.print(f"[yellow]![/] model not renewed: {what}; v{before} keeps serving", highlight=False)
    console.print(f"  next: {next_step}", highlight=False)
    raise NotRenewed(f"model not renewed: v{before} keeps serving")


def _wait(check: Callable[[], Any], timeout: float, what: str, poll: float = 3.0) -> Any:
    return wait_until(check, timeout, what, poll=poll, hint="look at the Airflow UI for the run's logs")


def run_drift_scenario(
    settings: Settings, *, site: str, records: int, drift: str, console: Console, timeout: float = 900
) -> str:
    """Drive the loop once through public interfaces; returns the new model version serving at the end.

    Raises :class:`NotRenewed` (after printing what happened and what to do next) when the loop
    ended with the same model serving: no drift seen, the gate refused, or approval pending.
    """
    from medops.app import platform
    from medops.app.airflow_api import FINISHED, AirflowError
    from medops.app.simulate import simulate

    started = time.monotonic()
    window = datetime.now(UTC).isoformat()  # the run below looks at exactly this traffic
    if (before := platform.serving_version(settings)) is None:
        raise RuntimeError("no champion is serving: run `make run` first")
    sent = simulate(site, records, drift, feedback=True, settings=settings, progress=False)
    console.print(
        f"[green]✓[/] {site}: {sent.scored} cases scored by v{before}, {sent.feedback_sent} diagnoses "
        f"sent back, {sent.rejected} refused"
    )

    not_renewed = functools.partial(_not_renewed, console, before)
    client = platform.airflow_client(settings)
    try:
        trained_before = {run.dag_run_id for run in client.runs("train_model")}
        run_id = client.trigger("monitor_drift", {"since": window})
        with console.status("[cyan]monitor_drift…"):
            monitored = client.wait_for_run("monitor_drift", run_id, timeout=timeout)
        if monitored.state.value != "success":
            raise RuntimeError(f"monitor_drift run {run_id} failed; see its log in the Airflow UI")
        result = client.xcom("monitor_drift", run_id, "check_drift")
        monitor_url = links.airflow_run(settings, "monitor_drift", run_id)
        console.print(
            f"[green]✓[/] monitor_drift: [bold]{result['verdict']}[/] "
            f"({', '.join(result.get('drifted_columns') or []) or 'no column drifted'}); "
            f"report {result.get('report_url') or result.get('report')}"
        )
        try:
            alert = client.xcom("monitor_drift", run_id, "alert_on_call")
        except AirflowError:  # a muted or skipped alert task pushes nothing
            alert = None
        console.print(f"  alert: {alert_delivery(alert)}", highlight=False)
        if not result.get("retrain"):  # only critical drift or performance_drop schedule a retraining
            seen = f"{result['verdict']} ({result.get('severity') or 'no severity'})"
            return not_renewed(
                f"monitor_drift saw {seen}, which does not retrain ({result.get('note') or 'see its run'})",
                f"send more or more strongly drifted traffic (--records, --drift), then look at {monitor_url}",
            )

        def new_training() -> DAGRunResponse | None:
            runs = [r for r in client.runs("train_model") if r.dag_run_id not in trained_before]
            return next((r for r in runs if r.state.value in FINISHED), None)

        with console.status("[cyan]train_model from the medops/drift Asset…"):
            training = _wait(new_training, timeout, "train_model after drift")
        training_url = links.airflow_run(settings, "train_model", training.dag_run_id)
        console.print(f"[green]✓[/] train_model {training.state.value} ({training_url})", highlight=False)
        if training.state.value != "success":
            raise RuntimeError(f"train_model failed; see its log at {training_url}")
        from pipelines import model_registry

        champion = model_registry.champion_version(settings)
        if champion == before:
            challenger = model_registry.alias_version("challenger", settings)
            tags = model_registry.version_tags(challenger, settings) if challenger else {}
            page = links.mlflow_model_version(settings, settings.model_name, challenger) if challenger else ""
            if tags.get("gate_decision") == "rejected" or tags.get("gate_passed") == "false":
                reasons = "; ".join(json.loads(tags.get("gate_reasons") or "[]"))
                return not_renewed(
                    f"the gate refused v{challenger} (ROC AUC {tags.get('roc_auc')}, sensitivity "
                    f"{tags.get('sensitivity')}): {reasons}",
                    f"compare it with the champion at {page}; feed back more labelled cases from the site "
                    "and trigger train_model, or review the gate's thresholds",
                )
            if challenger and tags.get("gate_passed") == "true":
                return not_renewed(
                    f"v{challenger} passed the gate and awaits approval",
                    f"approve it in Airflow's Required actions ({training_url}), after a look at {page}",
                )
            return not_renewed("no new model version was registered", f"see {training_url}")
        with console.status(f"[cyan]deploy_model: rolling out v{champion}…"):
            _wait(lambda: platform.serving_version(settings) == champion, timeout, f"v{champion} serving")
        console.print(
            f"[green]✓[/] v{champion} serving on {platform.urls(settings)['serving']} "
            f"(was v{before}; {time.monotonic() - started:.0f}s in all)"
        )
        return champion
    finally:
        client.close()
