"""The drift scenario `make run` offers: a hospital's traffic shifts and the platform renews itself.

Simulated drifted traffic (with the true diagnoses as feedback) -> `monitor_drift` through
Airflow's REST API -> the alert -> `train_model` from the `medops/drift` Asset -> `deploy_model`
-> the new champion answering on the serving port. Each stage is printed as it completes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console

from medops.core.processes import wait_until
from medops.core.settings import Settings

if TYPE_CHECKING:
    from airflow_client.client.models import DAGRunResponse


def _wait(check: Callable[[], Any], timeout: float, what: str, poll: float = 3.0) -> Any:
    return wait_until(check, timeout, what, poll=poll, hint="look at the Airflow UI for the run's logs")


def run_drift_scenario(
    settings: Settings, *, site: str, records: int, drift: str, console: Console, timeout: float = 900
) -> str:
    """Drive the loop once through public interfaces; returns the model version serving at the end."""
    from datetime import UTC, datetime

    from medops.app import platform
    from medops.app.airflow_api import FINISHED
    from medops.app.simulate import simulate

    started = time.monotonic()
    window = datetime.now(UTC).isoformat()  # the run below looks at exactly this traffic
    before = platform.serving_version(settings)
    if before is None:
        raise RuntimeError("no champion is serving: run `make run` first")
    sent = simulate(site, records, drift, feedback=True, settings=settings, progress=False)
    console.print(
        f"[green]✓[/] {site}: {sent.scored} cases scored by v{before}, {sent.feedback_sent} diagnoses "
        f"sent back, {sent.rejected} refused"
    )

    client = platform.airflow_client(settings)
    try:
        trained_before = {run.dag_run_id for run in client.runs("train_model")}
        run_id = client.trigger("monitor_drift", {"since": window})
        with console.status("[cyan]monitor_drift…"):
            monitored = client.wait_for_run("monitor_drift", run_id, timeout=timeout)
        if monitored.state.value != "success":
            raise RuntimeError(f"monitor_drift run {run_id} failed; see its log in the Airflow UI")
        result = client.xcom("monitor_drift", run_id, "check_drift")
        console.print(
            f"[green]✓[/] monitor_drift: [bold]{result['verdict']}[/] "
            f"({', '.join(result.get('drifted_columns') or []) or 'no column drifted'}); "
            f"report {result.get('report_url') or result.get('report')}"
        )
        if result["verdict"] != "drift":
            return before

        def new_training() -> DAGRunResponse | None:
            runs = [r for r in client.runs("train_model") if r.dag_run_id not in trained_before]
            return next((r for r in runs if r.state.value in FINISHED), None)

        with console.status("[cyan]train_model from the medops/drift Asset…"):
            training = _wait(new_training, timeout, "train_model after drift")
        console.print(f"[green]✓[/] train_model {training.state.value} ({training.dag_run_id})")
        if training.state.value != "success":
            raise RuntimeError("train_model failed; see its log in the Airflow UI")
        from pipelines import model_registry

        champion = model_registry.champion_version(settings)
        if champion == before:
            console.print(
                f"[yellow]![/] the new model did not pass the gate (or awaits approval): v{before} keeps serving"
            )
            return before
        with console.status(f"[cyan]deploy_model: rolling out v{champion}…"):
            _wait(lambda: platform.serving_version(settings) == champion, timeout, f"v{champion} serving")
        console.print(
            f"[green]✓[/] v{champion} serving on {platform.urls(settings)['serving']} "
            f"(was v{before}; {time.monotonic() - started:.0f}s in all)"
        )
        return champion
    finally:
        client.close()
