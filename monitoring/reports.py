"""A monitoring run: prediction-log window vs the champion's training rows, reports, alert.

:func:`run_monitoring` is what the ``monitor_drift`` DAG and ``medops monitor`` call. It takes the
predictions logged since the last report, restores the champion's training rows from its data
version, runs :func:`monitoring.drift.detect_drift`, and writes the result three ways:

- ``MEDOPS_HOME/reports/<timestamp>/``: ``drift.html``/``drift.json`` (Evidently), the same for
  ``performance`` when feedback labels exist, and ``summary.json`` (the verdict and every test);
- the Evidently workspace (``MEDOPS_HOME/evidently``), one project per registered model, shown by
  ``evidently ui --workspace MEDOPS_HOME/evidently --port MEDOPS_EVIDENTLY_PORT``;
- the champion version's MLflow run, as artifacts under ``monitoring/<timestamp>/`` (one click
  from the model's registry page), plus ``monitoring_*`` tags on the model version.

Reports carry model inputs and outputs only: encounter hashes, request ids and site names never
reach them (site verdicts are in ``summary.json`` by site id, which is not a patient identifier).
A window with fewer than ``drift_min_rows`` rows writes no report and is not consumed: its rows
stay in the next window until there are enough.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medops.core.files import write_atomically
from monitoring.drift import PROBABILITY, DriftResult, Verdict

if TYPE_CHECKING:
    import pandas as pd

    from medops.core.settings import Settings

log = logging.getLogger(__name__)

STAMP_FORMAT = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class ReportFiles:
    """Where one monitoring run's reports went on disk."""

    directory: Path
    summary: Path
    drift_html: Path | None = None
    drift_json: Path | None = None
    performance_html: Path | None = None
    performance_json: Path | None = None

    def files(self) -> list[Path]:
        return [path for path in asdict(self).values() if isinstance(path, Path) and path.is_file()]


@dataclass(frozen=True)
class Reference:
    """The champion's training rows (with its scores when the model could be loaded)."""

    frame: pd.DataFrame
    model_version: str
    data_version: str


@dataclass
class MonitoringResult:
    """One monitoring run, JSON-able (``to_dict``) so DAG tasks can pass it on.

    ``verdict`` is ``drift`` when the window as a whole drifted or any site with enough rows did
    (``sites`` lists those); ``drifted_columns`` are the window's, or the drifted sites' when only
    sites drifted.
    """

    verdict: str
    drifted_columns: list[str]
    share: float
    sites: list[str]
    n_current: int
    n_reference: int
    window_start: str | None
    window_end: str
    model_version: str | None = None
    data_version: str | None = None
    report_dir: str | None = None
    report: str | None = None
    report_url: str | None = None
    workspace_project_id: str | None = None
    snapshot_ids: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    prediction_drift: bool | None = None
    performance: dict[str, Any] | None = None
    note: str = ""
    alert: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def asset_extra(self) -> dict[str, Any]:
        """The ``medops/drift`` Asset event's extra."""
        return {
            "verdict": self.verdict,
            "drifted_columns": self.drifted_columns,
            "sites": self.sites,
            "report": self.report_url or self.report,
        }


# The run ---------------------------------------------------------------------------------------------
def run_monitoring(
    settings: Settings,
    *,
    since: datetime | None = None,
    now: datetime | None = None,
    alert: bool = True,
) -> MonitoringResult:
    """Monitor the prediction log window since the last report: drift, reports, and an alert on drift.

    ``since`` overrides where the window starts (default: where the last report's window ended,
    or the beginning of the log); the window ends at ``now``. With ``alert=False`` the caller
    alerts (the DAG does it in its own task, with :func:`alert_for_result`).
    """
    import pandas as pd

    from monitoring.drift import detect_drift
    from pipelines import model_registry
    from pipelines.prediction_log import read_feedback, read_predictions

    now = _utc(now or datetime.now(UTC))
    since = _utc(since) if since is not None else _window_state(settings).get("window_end")
    window = dict(window_start=since.isoformat() if since else None, window_end=now.isoformat())
    champion = model_registry.champion_version(settings)
    if champion is None:
        return _no_verdict(window, 0, None, "no @champion model yet: nothing is served, nothing to monitor")
    current = read_predictions(settings, since=since)
    current = current[current["logged_at"] < pd.Timestamp(now)]
    if len(current) < settings.drift_min_rows:  # before restoring and scoring the reference for nothing
        note = (
            f"{len(current)} rows since {window['window_start'] or 'the start of the log'}, fewer than "
            f"{settings.drift_min_rows}: no verdict, these rows stay in the next window"
        )
        return _no_verdict(window, len(current), champion, note)
    # Prediction drift compares the champion's scores with the champion's scores only.
    served_by_other = current["model_version"].astype(str) != str(champion)
    if served_by_other.any():
        current = current.assign(**{PROBABILITY: current[PROBABILITY].mask(served_by_other)})
    reference = load_reference(settings, champion)
    found = detect_drift(current, reference.frame, settings, feedback=read_feedback(settings), timestamp=now)
    result = _result(found, reference, window)

    stamp = now.strftime(STAMP_FORMAT)
    files = write_reports(found, settings, stamp=stamp, context=result.to_dict())
    result.report_dir, result.report = str(files.directory), str(files.drift_html or files.summary)
    result.report_url = files.drift_html.as_uri() if files.drift_html else None
    project_id, snapshots = add_to_workspace(found, settings, name=f"{stamp} v{champion}")
    result.workspace_project_id, result.snapshot_ids = project_id, snapshots
    if snapshots:
        result.report_url = evidently_url(settings, project_id, snapshots[0])
    result.mlflow_run_id = log_to_mlflow(files, settings, model_version=champion, stamp=stamp, result=result)
    _save_window_state(settings, now, result)
    if alert:
        result.alert = alert_for_result(result, settings)
    return result


def _no_verdict(window: dict[str, Any], rows: int, champion: str | None, note: str) -> MonitoringResult:
    return MonitoringResult(
        verdict=str(Verdict.INSUFFICIENT_DATA),
        drifted_columns=[],
        share=0.0,
        sites=[],
        n_current=rows,
        n_reference=0,
        model_version=champion,
        note=note,
        **window,
    )


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _result(found: DriftResult, reference: Reference, window: dict[str, Any]) -> MonitoringResult:
    sites = list(found.drifted_sites)
    drifted = list(found.drifted_columns)
    if found.verdict != Verdict.DRIFT and sites:
        drifted = sorted({column for site in sites for column in found.per_site[site].drifted_columns})
    verdict = Verdict.DRIFT if sites else found.verdict
    performance = asdict(found.performance) if found.performance else None
    return MonitoringResult(
        verdict=str(verdict),
        drifted_columns=drifted,
        share=found.share,
        sites=sites,
        n_current=found.n_current,
        n_reference=found.n_reference,
        model_version=reference.model_version,
        data_version=reference.data_version,
        prediction_drift=found.prediction_drift.drifted if found.prediction_drift else None,
        performance=performance,
        **window,
    )


def load_reference(settings: Settings, model_version: str) -> Reference:
    """The champion's training rows with its own scores, as its training run stored them.

    Read from the run (``reference/train.csv``: the exact rows and ``probability_malignant``),
    never split again from today's settings, so prediction drift compares like with like. A
    version whose run stored none raises :class:`pipelines.model_registry.MissingReference`.
    """
    from pipelines.model_registry import stored_reference

    stored = stored_reference(model_version, settings)
    return Reference(stored.train, model_version, stored.data_version or "unknown")


# Reports -----------------------------------------------------------------------------------------------
def write_reports(
    found: DriftResult, settings: Settings, *, stamp: str | None = None, context: dict[str, Any] | None = None
) -> ReportFiles:
    """Write the Evidently HTML/JSON and ``summary.json`` under ``reports_dir/<stamp>/``."""
    stamp = stamp or datetime.now(UTC).strftime(STAMP_FORMAT)
    directory = settings.reports_dir / stamp
    suffix = 1
    while directory.exists():  # two runs in the same second keep both
        suffix += 1
        directory = settings.reports_dir / f"{stamp}-{suffix}"
    directory.mkdir(parents=True)
    paths: dict[str, Path] = {}
    for name, snapshot in (("drift", found.drift_snapshot), ("performance", found.performance_snapshot)):
        if snapshot is None:
            continue
        paths[f"{name}_html"] = directory / f"{name}.html"
        paths[f"{name}_json"] = directory / f"{name}.json"
        snapshot.save_html(str(paths[f"{name}_html"]))
        snapshot.save_json(str(paths[f"{name}_json"]))
    summary = {**(context or {}), "drift": found.summary()}
    summary_path = directory / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return ReportFiles(directory=directory, summary=summary_path, **paths)


def workspace_project(workspace: Any, name: str) -> Any:
    """The workspace's project called ``name``, created (with a drift dashboard) when missing."""
    found = workspace.search_project(name)
    if found:
        return found[0]
    project = workspace.create_project(name, description=f"Drift and performance of the served model {name}")
    try:
        from evidently.sdk.models import PanelMetric
        from evidently.sdk.panels import line_plot_panel

        project.dashboard.add_panel(
            line_plot_panel(
                title="Share of drifted feature columns",
                values=[
                    PanelMetric(legend="share", metric="DriftedColumnsCount", metric_labels={"value_type": "share"})
                ],
            ),
            tab="Drift",
        )
    except Exception as error:  # the reports matter, the chart is a convenience
        log.warning("could not add the drift dashboard to Evidently project %s: %s", name, error)
    return project


def add_to_workspace(found: DriftResult, settings: Settings, *, name: str) -> tuple[str | None, list[str]]:
    """Add the run's snapshots to the Evidently workspace project of ``settings.model_name``."""
    snapshots = [s for s in (found.drift_snapshot, found.performance_snapshot) if s is not None]
    if not snapshots:
        return None, []
    from evidently.ui.workspace import Workspace

    settings.evidently_workspace.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(str(settings.evidently_workspace))
    project = workspace_project(workspace, settings.model_name)
    ids = []
    for kind, snapshot in zip(("drift", "performance"), snapshots, strict=False):
        ref = workspace.add_run(project.id, snapshot, include_data=False, name=f"{kind} {name}")
        ids.append(str(ref.id))
    return str(project.id), ids


def evidently_url(settings: Settings, project_id: str | None, snapshot_id: str) -> str:
    return f"http://{settings.host}:{settings.evidently_port}/projects/{project_id}/reports/{snapshot_id}"


def log_to_mlflow(
    files: ReportFiles, settings: Settings, *, model_version: str, stamp: str, result: MonitoringResult | None = None
) -> str:
    """Log the report folder to the model version's run under ``monitoring/<stamp>/`` and tag the version."""
    from pipelines import model_registry

    client = model_registry.client(settings)
    version = client.get_model_version(settings.model_name, str(model_version))
    if not version.run_id:
        raise RuntimeError(f"model version {model_version} has no MLflow run to log reports to")
    client.log_artifacts(version.run_id, str(files.directory), artifact_path=f"monitoring/{files.directory.name}")
    if result is not None:
        tags = {
            "monitoring_last_verdict": result.verdict,
            "monitoring_last_report": f"monitoring/{files.directory.name}",
            "monitoring_last_run": stamp,
        }
        if result.report_url and result.report_url.startswith("http"):  # a link people can click in MLflow
            tags["monitoring_last_report_url"] = result.report_url
        for key, value in tags.items():
            client.set_model_version_tag(settings.model_name, str(model_version), key, value)
    return version.run_id


# Window state and alerts -----------------------------------------------------------------------------
def _state_path(settings: Settings) -> Path:
    return settings.home / "state" / "monitoring.json"


def _window_state(settings: Settings) -> dict[str, Any]:
    path = _state_path(settings)
    if not path.exists():
        return {}
    state = json.loads(path.read_text())
    if state.get("window_end"):
        state["window_end"] = datetime.fromisoformat(state["window_end"])
    return state


def _save_window_state(settings: Settings, window_end: datetime, result: MonitoringResult) -> None:
    state = {"window_end": window_end.isoformat(), "last_report": result.report_dir, "verdict": result.verdict}
    write_atomically(_state_path(settings), json.dumps(state, indent=1) + "\n")


def alert_for_result(result: MonitoringResult | dict[str, Any], settings: Settings) -> dict[str, Any] | None:
    """Alert on-call people about drift; nothing for ``no_drift`` or ``insufficient_data``."""
    from medops.core.alerts import send_alert

    data = result.to_dict() if isinstance(result, MonitoringResult) else result
    if data["verdict"] != Verdict.DRIFT:
        return None
    sites = data.get("sites") or []
    where = f"at {', '.join(sites)}" if sites else "across sites"
    title = f"Drift in what {settings.model_name} v{data.get('model_version')} receives {where}"
    # Details stay free of counts that change every run, or deduplication would never match.
    details = "The distribution of probability_malignant drifted too." if data.get("prediction_drift") else None
    outcome = send_alert(
        title,
        data["verdict"],
        data["drifted_columns"],
        ", ".join(sites) or None,
        data.get("report_url") or data.get("report"),
        settings,
        severity="warning",
        details=details,
    )
    return asdict(outcome)
