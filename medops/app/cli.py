"""The `medops` command: the same functions the DAGs call, for people at a terminal.

Errors are one clear line on stderr and a non-zero exit code; long work shows progress.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from medops.core.settings import REPO_ROOT, Settings, get_settings

app = typer.Typer(
    name="medops",
    help="medops: version clinical data, train, gate, serve and monitor diagnosis models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="The seed dataset and the data registry.", no_args_is_help=True)
app.add_typer(data_app, name="data")

# soft_wrap: a long line (a URL, a path) stays one line when output goes to a log or a pipe,
# where rich would otherwise break it at 80 columns and the link would no longer work.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


@app.callback()
def _private_files() -> None:
    """Everything medops writes under MEDOPS_HOME (and every process it starts) is private to its user,
    and no model is ever unpickled (see pipelines/model_trust.py)."""
    from medops.core.processes import PICKLE_SWITCH

    os.umask(0o077)
    os.environ[PICKLE_SWITCH] = "false"
    # MLflow draws a progress bar for every artifact it downloads (the gate reads the stored rows)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def terminal_user() -> str:
    """The actor of what a person does at the terminal: their operating-system user name."""
    from pipelines.governance import terminal_user as user

    return user()


def one_line_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn any failure into one readable line and exit 1 (a traceback with MEDOPS_DEBUG=1)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as error:
            if os.environ.get("MEDOPS_DEBUG"):
                raise
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def command(target: typer.Typer = app, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``target.command(**kwargs)`` for a function whose failures are one line (:func:`one_line_errors`)."""
    return lambda func: target.command(**kwargs)(one_line_errors(func))


@contextmanager
def step(message: str):
    """A spinner for work that takes more than a moment."""
    with console.status(f"[cyan]{message}…", spinner="dots"):
        yield
    console.print(f"[green]✓[/] {message}")


def emit(payload: dict[str, Any]) -> None:
    """Print ``payload`` as JSON (what ``--json`` asks for)."""
    out.print_json(json.dumps(payload, default=str))


@command()
def init() -> None:
    """Create MEDOPS_HOME: the data registry (seed as data-v1), DVC remote, MLflow store, Airflow home."""
    from pipelines import data_registry, model_registry

    settings = get_settings()
    for folder in (settings.landing_dir, settings.quarantine_dir, settings.airflow_home, settings.reports_dir,
                   settings.predictions_dir, settings.run_dir):  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
    with step("data registry (git + DVC) with the seed as data-v1"):
        version = data_registry.init_registry(settings, actor=terminal_user())
    with step("MLflow store"):
        model_registry.ensure_experiment(settings)
    out.print(f"MEDOPS_HOME   {settings.home}")
    out.print(f"data registry {settings.registry_dir} ({version.tag}, {version.rows} rows, dvc {version.dvc_md5})")
    out.print(f"DVC remote    {settings.dvc_remote_url}")
    out.print(f"MLflow store  {settings.tracking_uri}")


@command(data_app, name="seed")
def data_seed(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write seed.csv into.")] = REPO_ROOT / "data",
) -> None:
    """Write the seed dataset deterministically (the data.dvc in the repo pins its hash)."""
    from pipelines.data import write_seed

    path = write_seed(out_dir)
    out.print(f"wrote {path}")


@command(data_app, name="restore")
def data_restore(
    version: Annotated[str, typer.Argument(help="Data version tag, e.g. data-v1.")],
    to: Annotated[Path, typer.Option("--to", help="Empty folder to restore the rows into.")],
) -> None:
    """Restore the exact rows of a data version from the DVC remote."""
    from pipelines import data_registry

    with step(f"restoring {version}"):
        path = data_registry.restore_version(version, to, get_settings())
    out.print(f"{version} restored into {path}")


@command(data_app, name="versions")
def data_versions(as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False) -> None:
    """List data versions with their DVC hashes and row counts."""
    from pipelines import data_registry

    settings = get_settings()
    rows = [data_registry.version_info(tag, settings) for tag in data_registry.list_versions(settings)]
    if as_json:
        return emit({"versions": rows})
    for row in rows:
        out.print(f"{row['tag']:>10}  {row['rows']:>7} rows  {row['dvc_md5']}  {row['commit'][:10]}")


@command()
def ingest(
    file: Annotated[Path, typer.Argument(help="CSV batch to validate and version.", exists=False)],
    site: Annotated[str | None, typer.Option("--site", help="site_id for rows that name none.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Validate a batch: good rows become a new data version, the rest go to quarantine with reasons."""
    from pipelines.ingest import ingest_file

    with step(f"validating and versioning {file.name}"):
        result = ingest_file(file, get_settings(), site_id=site, actor=terminal_user())
    if as_json:
        return emit(result.to_dict())
    out.print(result.summary(), highlight=False)


@command(data_app, name="purge-landing")
def data_purge_landing(
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Delete ingested files kept in landing/processed/ longer than MEDOPS_LANDING_RETENTION_DAYS."""
    from pipelines.ingest import purge_landing

    result = purge_landing(get_settings())
    if as_json:
        return emit(result.__dict__)
    out.print(
        f"purged {result.purged} archived landed file(s) older than {result.retention_days:g} days; kept {result.kept}"
    )


@command()
def train(
    family: Annotated[list[str] | None, typer.Option("--family", help="Model family (repeatable).")] = None,
    data_version: Annotated[
        str | None, typer.Option("--data-version", help="Data version (data-vN) to train on; default: the latest.")
    ] = None,
    sensitivity_lower: Annotated[
        float | None,
        typer.Option(
            "--sensitivity-lower",
            "--min-sensitivity",
            help="Gate: floor on the lower 95 % bound of sensitivity (default: the protocol's).",
        ),
    ] = None,
    roc_auc_lower: Annotated[
        float | None,
        typer.Option(
            "--roc-auc-lower",
            "--min-roc-auc",
            help="Gate: floor on the lower 95 % bound of ROC AUC (default: the protocol's).",
        ),
    ] = None,
    non_inferiority_margin: Annotated[
        float | None,
        typer.Option(
            "--non-inferiority-margin",
            help="Gate: how far below the champion's AUC the lower bound may go (default: the protocol's).",
        ),
    ] = None,
    approved_by: Annotated[
        str | None,
        typer.Option("--approved-by", help="Who approved a change the protocol reserves for a person (their name)."),
    ] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Why the approved change is acceptable.")] = None,
    promote: Annotated[bool, typer.Option("--promote/--no-promote", help="Move @champion if the gate passes.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train on a data version, log to MLflow, register @challenger, gate it, and promote if it passes.

    Thresholds looser than the modification protocol's floors need --approved-by NAME --reason TEXT;
    both go to the audit trail.
    """
    from pipelines import train as training

    settings = get_settings()
    actor = terminal_user()
    thresholds = {
        "sensitivity_lower": sensitivity_lower,
        "roc_auc_lower": roc_auc_lower,
        "non_inferiority_margin": non_inferiority_margin,
    }
    with step("training (cross-validated search over model families)"):
        result = training.train_model(
            settings,
            data_version=data_version,
            families=family,
            thresholds=thresholds,
            actor=actor,
            approved_by=approved_by,
            approval_reason=reason,
        )
    if promote:
        result.promoted = training.promote(
            result, settings, approved_by=approved_by, approval_reason=reason, actor=actor
        )
    if as_json:
        return emit(result.to_dict())
    m, figures = result.metrics, result.gate.overall.candidate
    out.print(
        f"model version {result.model_version} ({result.family}) on {result.data_version}: "
        f"ROC AUC {m['roc_auc']:.4f}, sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f}, "
        f"threshold {result.threshold:.3f}",
        highlight=False,
    )
    if figures.sensitivity is not None:
        out.print(
            f"hold-out {result.holdout.get('rows')} rows ({result.holdout.get('malignant')} malignant): "
            f"sensitivity lower bound {figures.sensitivity.lower:.3f}"
            + (f", specificity lower bound {figures.specificity.lower:.3f}" if figures.specificity else "")
            + (f", ROC AUC lower bound {figures.roc_auc.lower:.4f}" if figures.roc_auc else ""),
            highlight=False,
        )
    out.print(f"gate {'passed' if result.gate.passed else 'FAILED'}:", highlight=False)
    for line in result.gate.reasons:
        out.print(f"  {line}", highlight=False)
    out.print("promoted to @champion" if result.promoted else "@champion unchanged")


@command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False) -> None:
    """Data versions, the champion, and which platform services are up."""
    from medops.app import platform
    from pipelines import data_registry, model_registry

    settings = get_settings()
    data_version = data_registry.latest_version(settings)
    champion = model_registry.champion_version(settings) if (settings.mlflow_dir / "mlflow.db").exists() else None
    payload: dict[str, Any] = {"home": str(settings.home), "data_version": data_version, "champion": champion}
    if champion:
        payload["champion_tags"] = model_registry.version_tags(champion, settings)
    payload["services"] = platform.service_status(settings)
    payload.update(_monitoring_status(settings))
    if as_json:
        return emit(payload)
    out.print(f"MEDOPS_HOME  {payload['home']}")
    out.print(f"data         {payload['data_version'] or 'no registry yet (medops init)'}")
    if champion:
        tags = payload["champion_tags"]
        out.print(
            f"champion     v{champion} ({tags.get('family')}, trained on {tags.get('data_version')}, "
            f"ROC AUC {tags.get('roc_auc')}, sensitivity {tags.get('sensitivity')})"
        )
    else:
        out.print("champion     none yet")
    challenger = payload.get("challenger")
    if challenger and challenger.get("version") != champion:
        decision = challenger.get("gate") or "not yet decided"
        out.print(f"challenger   v{challenger['version']} (gate {decision})", highlight=False)
    verdict = payload["last_verdict"]
    out.print(
        f"last verdict {verdict['verdict']} ({verdict['report']})" if verdict else "last verdict none yet",
        highlight=False,
    )
    last = payload["last_alert"]
    out.print(f"last alert   {last['time']} {last['title']} ({last['delivery']})" if last else "last alert   none")
    channels = ", ".join(payload["alert_channels"]) or "[yellow]none[/]: alerts wait in the outbox (medops alerts)"
    out.print(f"alerts to    {channels}")
    if payload["undelivered_alerts"]:
        out.print(f"outbox       [yellow]{payload['undelivered_alerts']} undelivered alert(s)[/]: medops alerts")
    for name, info in payload["services"].items():
        state = f"[green]up[/] {info['url']}" if info["up"] else "[dim]down[/]"
        out.print(f"{name:<12} {state}")


def _monitoring_status(settings: Settings) -> dict[str, Any]:
    """Last drift verdict, last alert (sent or waiting), the challenger, and where alerts go."""
    from medops.core.alerts import configured_channels, outbox_alerts, sent_alerts

    state_file = settings.home / "state" / "monitoring.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    verdict = {"verdict": state["verdict"], "report": state.get("last_report")} if state.get("verdict") else None
    waiting = outbox_alerts(settings)
    last = None
    sent = sent_alerts(settings)
    if waiting and (not sent or waiting[0]["time"] >= sent[-1]):
        last = {"time": waiting[0]["time"], "title": waiting[0]["title"], "delivery": "undelivered, in the outbox"}
    elif sent:
        last = {"time": sent[-1], "title": "(deduplicated record)", "delivery": "sent"}
    payload: dict[str, Any] = {
        "last_verdict": verdict,
        "last_alert": last,
        "alert_channels": configured_channels(settings),
        "undelivered_alerts": len(waiting),
        "challenger": None,
    }
    if (settings.mlflow_dir / "mlflow.db").exists():
        from pipelines import model_registry

        if version := model_registry.alias_version("challenger", settings):
            tags = model_registry.version_tags(version, settings)
            payload["challenger"] = {
                "version": version,
                "gate": tags.get("gate_decision"),
                "reasons": json.loads(tags.get("gate_reasons") or "[]"),
            }
    return payload


@command()
def alerts(as_json: Annotated[bool, typer.Option("--json", help="Print the alerts as JSON.")] = False) -> None:
    """Alerts no channel delivered (none configured, or every one failed), newest first."""
    from medops.core.alerts import configured_channels, outbox_alerts

    settings = get_settings()
    waiting = outbox_alerts(settings)
    if as_json:
        return emit({"channels": configured_channels(settings), "outbox": waiting})
    if not configured_channels(settings):
        out.print(
            "No alert channel is configured: set MEDOPS_ALERT_WEBHOOK_URL (Slack-shaped webhook) or "
            "MEDOPS_SMTP_HOST with MEDOPS_ALERT_EMAIL_TO.",
            highlight=False,
        )
    if not waiting:
        out.print("outbox empty: every alert was delivered", highlight=False)
    for alert in waiting:
        out.print(f"{alert.get('time')}  [{alert.get('severity')}] {alert.get('title')}", highlight=False)
        if alert.get("report_url"):
            out.print(f"  report   {alert['report_url']}", highlight=False)
        if failed := {k: v for k, v in (alert.get("channels") or {}).items() if v != "not configured"}:
            out.print(f"  channels {failed}", highlight=False)
        out.print(f"  file     {alert['path']}", highlight=False)


@command()
def up(
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until a champion is serving.")] = True,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            help="standalone (embedded: SQLite, LocalExecutor) or cluster (PostgreSQL, Celery workers, "
            "MLflow and WebDAV servers). Default: MEDOPS_PROFILE, else standalone.",
        ),
    ] = None,
) -> None:
    """Start the whole platform and run the loop once (what `make run` does)."""
    from medops.app import platform
    from medops.core.settings import reset_settings

    if profile is not None:
        if profile not in ("standalone", "cluster"):
            raise typer.BadParameter(f"{profile!r}: expected standalone or cluster", param_hint="--profile")
        # Through the environment, so every process `up` starts inherits it (and `down` is told by the record).
        os.environ["MEDOPS_PROFILE"] = profile
        reset_settings()
    platform.up(get_settings(), wait=wait, console=console, out=out)


@command()
def down() -> None:
    """Stop every process `medops up` started (what `make stop` does)."""
    from medops.app import platform

    platform.down(get_settings(), console=console)


@command(name="drift-scenario")
def drift_scenario(
    site: Annotated[str, typer.Option("--site", help="site_id whose traffic drifts.")] = "site-d",
    records: Annotated[int, typer.Option("--records", min=1, help="How many cases the site sends.")] = 400,
    drift: Annotated[str, typer.Option("--drift", help="covariate, prevalence or units")] = "covariate",
) -> None:
    """Drifted traffic -> monitor_drift -> alert -> retrain -> new champion serving, on the running platform."""
    from medops.app.scenario import run_drift_scenario

    run_drift_scenario(get_settings(), site=site, records=records, drift=drift, console=console)


from medops.app import governance_commands, keys_commands, monitoring_commands, serving_commands  # noqa: E402

for commands in (serving_commands, monitoring_commands, governance_commands, keys_commands):  # they extend `app`
    commands.register(app)


if __name__ == "__main__":
    app()
