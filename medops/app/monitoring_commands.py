"""``medops monitor`` and ``medops simulate``: the functions the monitor_drift DAG calls, at a terminal.

Heavy imports happen inside the commands, so ``medops --help`` stays quick.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add ``monitor`` and ``simulate`` to the ``medops`` command line."""
    from medops.app.cli import command, emit, out, step
    from medops.core.settings import get_settings

    @command(app)
    def monitor(
        since: Annotated[
            datetime | None, typer.Option("--since", help="Start of the window (default: the last report's end).")
        ] = None,
        alert: Annotated[
            bool,
            typer.Option(
                "--alert/--no-alert",
                help="Alert on-call people on drift, a performance drop or a data-quality incident.",
            ),
        ] = True,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        """Judge the prediction log now: signals and verdict, Evidently reports, and an alert when it matters."""
        from monitoring.reports import run_monitoring

        with step("comparing the prediction log with the champion's training rows"):
            result = run_monitoring(get_settings(), since=since, alert=alert)
        if as_json:
            return emit(result.to_dict())
        colour = {"drift": "red", "performance_drop": "red", "no_drift": "green"}.get(result.verdict, "yellow")
        rows = f"{result.n_current} predictions, model v{result.model_version}"
        severity = f" {result.severity}" if result.severity else ""
        out.print(f"verdict  [bold {colour}]{result.verdict}{severity}[/] ({rows})")
        for signal in result.signals:
            out.print(f"signal   {signal['scope']}: {signal['text']}", highlight=False)
        if result.retrain:
            out.print("retrain  due: the monitor_drift DAG announces medops/drift for this verdict (not this command)")
        if result.drifted_columns:
            out.print(f"drifted  {', '.join(result.drifted_columns)}", highlight=False)
        if result.sites:
            out.print(f"sites    {', '.join(result.sites)}", highlight=False)
        if result.note:
            out.print(f"note     {result.note}", highlight=False)
        if result.report:
            out.print(f"report   {result.report}", highlight=False)
        if result.report_url and result.report_url != result.report:
            out.print(f"UI       {result.report_url}", highlight=False)
        if result.alert:
            out.print(f"alert    {'sent' if result.alert['sent'] else 'not sent'} {result.alert['channels']}")

    @command(app)
    def simulate(
        site: Annotated[str, typer.Option("--site", help="site_id the simulated hospital sends.")],
        records: Annotated[int, typer.Option("--records", min=1, help="How many cases to send.")] = 500,
        drift: Annotated[
            str | None, typer.Option("--drift", help="Shift the traffic: covariate, prevalence or units.")
        ] = None,
        feedback: Annotated[bool, typer.Option("--feedback", help="Send the true diagnoses to /feedback.")] = False,
        url: Annotated[str | None, typer.Option("--url", help="Service URL (default: the local service).")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Records per /predict request.")] = 50,
        seed: Annotated[int | None, typer.Option("--seed", help="Seed for reproducible traffic.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        """Send realistic clinical traffic from one site to the service, optionally shifted."""
        from dataclasses import asdict

        from medops.app.simulate import DRIFTS
        from medops.app.simulate import simulate as run

        if drift is not None and drift not in DRIFTS:
            raise typer.BadParameter(f"choose from {', '.join(DRIFTS)}", param_hint="--drift")
        summary = run(
            site,
            records,
            drift,
            feedback,
            get_settings(),
            base_url=url,
            batch_size=batch_size,
            seed=seed,
            progress=not as_json,
        )
        if as_json:
            return emit(asdict(summary))
        out.print(
            f"{summary.site}: sent {summary.records} records in {summary.batches} batches "
            f"({summary.seconds:.1f} s): {summary.scored} scored "
            f"({summary.predicted_malignant} predicted malignant), {summary.rejected} rejected (422)",
            highlight=False,
        )
        for reason, count in summary.rejection_reasons.items():
            out.print(f"  refused  {count:>5}  {reason}", highlight=False)
        if feedback:
            out.print(f"feedback: {summary.feedback_sent} true diagnoses sent", highlight=False)
        if summary.model_versions:
            out.print(f"model version(s): {', '.join(summary.model_versions)}", highlight=False)
