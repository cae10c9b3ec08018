"""A monitoring run: prediction-log window vs the champion's training rows, reports, alert.

:func:`run_monitoring` is what the ``monitor_drift`` DAG and ``medops monitor`` call. It takes the
predictions logged since the last report, restores the champion's training rows from its data
version, runs :func:`monitoring.drift.detect_drift`, and writes the result three ways:

- ``MEDOPS_HOME/reports/<timestamp>/``: ``drift.html``/``drift.json`` (Evidently), the same for
  ``performance`` when feedback labels exist, and ``summary.json`` (the verdict and every test);
- the Evidently workspace (``MEDOPS_HOME/evidently``), one project per registered model whose
  dashboard (:mod:`monitoring.dashboard`) charts each window's verdict, its signals against their
  thresholds, sensitivity and each site, shown by ``evidently ui --workspace MEDOPS_HOME/evidently
  --port MEDOPS_EVIDENTLY_PORT``; every report names the model version, its data version and MLflow page;
- the champion version's MLflow run, as artifacts under ``monitoring/<timestamp>/`` (one click
  from the model's registry page), plus ``monitoring_*`` tags on the model version.

Reports carry model inputs and outputs only: encounter hashes, request ids and site names never
reach them (site verdicts are in ``summary.json`` by site id, which is not a patient identifier).
A window with fewer than ``drift_min_rows`` rows writes no report and is not consumed: its rows
stay in the next window until there are enough.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medops.core.files import write_atomically
from medops.core.links import evidently_report
from monitoring.drift import PROBABILITY, DriftResult, Verdict, plain

if TYPE_CHECKING:
    import pandas as pd

    from medops.core.settings import Settings
    from monitoring.estimation import PerformanceEstimator
    from monitoring.judge import ScopeVerdict, WindowVerdict

STAMP_FORMAT = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class Reference:
    """What the champion's training run stored: training rows and hold-out rows with its scores,
    each feature's importance, and its operating threshold on ``probability_malignant``."""

    frame: pd.DataFrame
    model_version: str
    data_version: str
    holdout: pd.DataFrame | None = None
    importance: dict[str, float] = field(default_factory=dict)
    threshold: float = 0.5


@dataclass
class MonitoringResult:
    """One monitoring run, JSON-able (``to_dict``) so DAG tasks can pass it on.

    ``verdict``/``severity`` are the judge's for the window, led by the gravest scope;
    ``retrain`` says whether ``medops/drift`` is due. ``sites`` are the sites whose own verdict is
    not ``no_drift``; ``signals`` every fired signal; ``drifted_columns`` the features the fired
    drift signals name; ``share`` and ``column_verdict`` are the plain column-count rule's.
    """

    verdict: str
    drifted_columns: list[str]
    share: float
    sites: list[str]
    n_current: int
    n_reference: int
    window_start: str | None
    window_end: str
    severity: str | None = None
    retrain: bool = False
    scope: str | None = None
    signals: list[dict[str, Any]] = field(default_factory=list)
    site_verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    estimated_performance: dict[str, Any] | None = None
    realized_performance: dict[str, Any] | None = None
    column_verdict: str | None = None
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
            "severity": self.severity,
            "drifted_columns": self.drifted_columns,
            "sites": self.sites,
            "signals": sorted({signal["name"] for signal in self.signals}),
            "report": self.report_url or self.report,
        }


# The run ---------------------------------------------------------------------------------------------
FEEDBACK_LOOKBACK_DAYS = 30
"""How far back predictions are read to find the latest labelled cases of each site."""


def run_monitoring(
    settings: Settings,
    *,
    since: datetime | None = None,
    now: datetime | None = None,
    alert: bool = True,
) -> MonitoringResult:
    """Monitor the prediction log window since the last report: signals, verdict, reports, and an alert.

    ``since`` overrides where the window starts (default: where the last report's window ended,
    or the beginning of the log); the window ends at ``now``. The signals are fed with what the
    champion's training run stored, the latest feedback labels per site and the service's
    per-site scored and refused counts. With ``alert=False`` the caller alerts (the DAG does it in
    its own task, with :func:`alert_for_result`).
    """
    import pandas as pd

    from monitoring.drift import detect_drift
    from monitoring.judge import judge_window
    from monitoring.signals import compute_signals
    from pipelines import model_registry
    from pipelines.prediction_log import read_feedback, read_predictions, read_refusals, site_traffic

    now = _utc(now or datetime.now(UTC))
    state = _window_state(settings)
    since = _utc(since) if since is not None else state.get("window_end")
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
    feedback = read_feedback(settings)
    traffic = site_traffic(current, read_refusals(settings, since=since, until=now))
    signals = compute_signals(
        current,
        reference.frame,
        settings,
        importance=reference.importance,
        estimator=performance_estimator(reference, settings),
        feedback=feedback,
        labelled=latest_labels(settings, feedback, now, current),
        traffic=traffic,
        baseline_traffic=state.get("traffic") or None,
    )
    judged = judge_window(signals)
    versions = report_metadata(settings, reference)
    found = detect_drift(
        current, reference.frame, settings, feedback=feedback, timestamp=now, judged=judged, metadata=versions
    )
    result = _result(found, judged, reference, window)

    stamp = now.strftime(STAMP_FORMAT)
    verdict = verdict_snapshot(judged, settings, now, versions)
    kinds = [("drift", found.drift_snapshot), ("performance", found.performance_snapshot), ("verdict", verdict)]
    directory = write_reports(found, settings, kinds, stamp=stamp, context=result.to_dict(), judged=judged)
    drift_html = directory / "drift.html" if found.drift_snapshot is not None else None
    result.report_dir, result.report = str(directory), str(drift_html or directory / "summary.json")
    result.report_url = drift_html.as_uri() if drift_html else None
    project_id, snapshots = add_to_workspace(settings, kinds, name=f"{stamp} v{champion}", sites=list(judged.sites))
    result.workspace_project_id, result.snapshot_ids = project_id, snapshots
    if snapshots:
        result.report_url = evidently_report(settings, str(project_id), str(snapshots[0]))
    result.mlflow_run_id = log_to_mlflow(directory, settings, model_version=champion, stamp=stamp, result=result)
    _save_window_state(settings, now, result, _next_baseline(state.get("traffic") or {}, traffic, result))
    if alert:
        result.alert = alert_for_result(result, settings)
    return result


def performance_estimator(reference: Reference, settings: Settings) -> PerformanceEstimator | None:
    """CBPE calibrated on the champion's stored hold-out rows: true diagnoses and its own scores on
    rows it did not train on (in-sample scores would flatter every estimate)."""
    from monitoring.estimation import PerformanceEstimator
    from pipelines.schema import LABEL, POSITIVE

    holdout = reference.holdout
    if holdout is None or holdout.empty or PROBABILITY not in holdout.columns:
        return None
    return PerformanceEstimator(reference.threshold, seed=settings.seed).fit(
        holdout[PROBABILITY].to_numpy(dtype="float64"), (holdout[LABEL] == POSITIVE).to_numpy()
    )


def latest_labels(settings: Settings, feedback: pd.DataFrame, now: datetime, window: pd.DataFrame) -> pd.DataFrame:
    """Labelled predictions of the last FEEDBACK_LOOKBACK_DAYS days served by any version, the window's
    included, oldest first: labels come back days after the prediction, so a window's own predictions
    rarely have enough of them for a confident sensitivity (:func:`monitoring.signals.compute_signals`
    judges the latest ``monitor_label_window`` of each site and overall)."""
    import pandas as pd

    from monitoring.drift import label_predictions
    from pipelines.prediction_log import read_predictions

    if feedback.empty:
        return label_predictions(window, feedback)
    since = pd.Timestamp(now) - pd.Timedelta(days=FEEDBACK_LOOKBACK_DAYS)
    start = window["logged_at"].min() if len(window) else pd.Timestamp(now)
    earlier = read_predictions(settings, since=since.to_pydatetime())
    earlier = earlier[earlier["logged_at"] < start]
    predictions = pd.concat([earlier, window], ignore_index=True) if len(earlier) else window
    return label_predictions(predictions, feedback)


def _next_baseline(baseline: dict[str, Any], traffic: dict[str, Any], result: MonitoringResult) -> dict[str, Any]:
    """This window's traffic per site as the next window's refusal baseline, except where it was a
    data-quality incident (an incident must not become the normal the next window is judged by)."""
    incidents = {site for site, found in result.site_verdicts.items() if found["verdict"] == Verdict.DATA_QUALITY}
    return baseline | {site: counts for site, counts in traffic.items() if site not in incidents}


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


def _result(
    found: DriftResult, judged: WindowVerdict, reference: Reference, window: dict[str, Any]
) -> MonitoringResult:
    from monitoring.signals import WINDOW

    scopes = {WINDOW: judged.window, **judged.sites}
    sites = [site for site, verdict in judged.sites.items() if verdict.fired and verdict.verdict != Verdict.NO_DRIFT]
    fired = [signal.to_dict() for scope in scopes.values() for signal in scope.fired]
    drifted = sorted(
        {
            item["feature"]
            for signal in fired
            if signal["points_to"] == Verdict.DRIFT
            for key in ("drifted", "strongly_drifted")
            for item in signal["figures"].get(key, [])
        }
    )
    estimated = next((s.figures for s in judged.window.signals if s.name == "estimated_performance"), None)
    realized = next((s.figures for s in judged.window.signals if s.name == "realized_performance"), None)
    return MonitoringResult(
        verdict=str(judged.verdict),
        severity=str(judged.severity) if judged.severity else None,
        retrain=judged.retrain,
        scope=judged.scope,
        signals=fired,
        site_verdicts={
            site: {
                "verdict": str(verdict.verdict),
                "severity": str(verdict.severity) if verdict.severity else None,
                "n_rows": verdict.n_rows,
                "fired": [signal.to_dict() for signal in verdict.fired],
            }
            for site, verdict in judged.sites.items()
        },
        estimated_performance=plain(dict(estimated)) if estimated else None,
        realized_performance=plain(dict(realized)) if realized else None,
        column_verdict=str(found.verdict),
        drifted_columns=drifted,
        share=found.share,
        sites=sites,
        n_current=found.n_current,
        n_reference=found.n_reference,
        model_version=reference.model_version,
        data_version=reference.data_version,
        prediction_drift=found.prediction_drift.drifted if found.prediction_drift else None,
        performance=asdict(found.performance) if found.performance else None,
        **window,
    )


def load_reference(settings: Settings, model_version: str) -> Reference:
    """The champion's training rows with its own scores, as its training run stored them (never split
    again from today's settings, so prediction drift compares like with like); a version whose run
    stored none raises :class:`pipelines.model_registry.MissingReference`."""
    from pipelines.model_registry import stored_reference, version_tags

    stored = stored_reference(model_version, settings)
    threshold = version_tags(model_version, settings).get("threshold")
    return Reference(
        stored.train,
        model_version,
        stored.data_version or "unknown",
        holdout=stored.holdout,
        importance=stored.importance,
        threshold=float(threshold) if threshold else 0.5,
    )


# Reports -----------------------------------------------------------------------------------------------
def write_reports(
    found: DriftResult,
    settings: Settings,
    snapshots: list[tuple[str, Any]],
    *,
    stamp: str,
    context: dict[str, Any],
    judged: WindowVerdict,
) -> Path:
    """Write each snapshot (``(kind, snapshot)``, None skipped) as ``<kind>.html``/``.json`` in a new
    folder ``reports_dir/<stamp>/`` (returned), and ``summary.json``: ``context`` (the :class:`MonitoringResult`), the
    column tests (``drift``) and every signal of the window and of each site (``verdict_signals``)."""
    directory = settings.reports_dir / stamp
    suffix = 1
    while directory.exists():  # two runs in the same second keep both
        suffix += 1
        directory = settings.reports_dir / f"{stamp}-{suffix}"
    directory.mkdir(parents=True)
    for name, snapshot in snapshots:
        if snapshot is not None:
            snapshot.save_html(str(directory / f"{name}.html"))
            snapshot.save_json(str(directory / f"{name}.json"))
    summary = {**context, "drift": found.summary(), "verdict_signals": judged.summary()}
    (directory / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return directory


def verdict_figures(judged: WindowVerdict, settings: Settings) -> dict[str, float]:
    """The verdict, the figures behind it and their thresholds, as numbers the dashboard charts.

    Each becomes ``MeanValue(column=<name>)`` in the ``verdict`` snapshot; thresholds are figures
    too (see :mod:`monitoring.dashboard`). A figure that does not exist this window (no labels
    yet, too few rows, a Wasserstein test instead of a p-value) is left out rather than charted as zero.
    """
    from monitoring.dashboard import site_figure
    from monitoring.judge import SEVERITY_CODES, VERDICT_CODES

    def figure(scope: ScopeVerdict, signal_name: str, key: str) -> Any:
        signal = next((s for s in scope.signals if s.name == signal_name), None)
        return signal.figures.get(key) if signal else None

    def p_value(scope: ScopeVerdict) -> float | None:
        ks = figure(scope, "prediction_drift", "test") == "ks"
        return figure(scope, "prediction_drift", "score") if ks else None

    window = judged.window
    low, high = figure(window, "estimated_performance", "sensitivity_interval") or (None, None)
    figures: dict[str, Any] = {
        "verdict_code": VERDICT_CODES[judged.verdict],
        "severity_code": SEVERITY_CODES[judged.severity],
        "retrain": float(judged.retrain),
        "sites_alerting": len(judged.alerting_sites),
        "prediction_drift_p_value": p_value(window),
        "threshold_prediction_drift_p_value": settings.monitor_prediction_drift_p_value,
        "importance_weighted_share": figure(window, "important_feature_drift", "weighted_share"),
        "threshold_importance_share": settings.monitor_importance_share,
        "column_share": figure(window, "column_share_drift", "share"),
        "threshold_column_share": settings.drift_share_threshold,
        "estimated_sensitivity": figure(window, "estimated_performance", "sensitivity"),
        "estimated_sensitivity_low": low,
        "estimated_sensitivity_high": high,
        "estimated_specificity": figure(window, "estimated_performance", "specificity"),
        "estimated_ppv": figure(window, "estimated_performance", "ppv"),
        "realized_sensitivity": figure(window, "realized_performance", "sensitivity"),
        "realized_specificity": figure(window, "realized_performance", "specificity"),
        "realized_labelled": figure(window, "realized_performance", "labelled"),
        "gate_min_sensitivity": settings.min_sensitivity,
        "threshold_refusal_critical_rate": settings.monitor_refusal_critical_rate,
    }
    refusal_rates = []
    for site, scope in judged.sites.items():
        rate, ceiling = figure(scope, "refusal_rate", "refusal_rate"), figure(scope, "refusal_rate", "baseline_ceiling")
        refusal_rates.append(rate)
        figures |= {
            site_figure("prediction_drift_p_value", site): p_value(scope),
            site_figure("estimated_sensitivity", site): figure(scope, "estimated_performance", "sensitivity"),
            site_figure("refusal_rate", site): rate,
            # A site's refusals fire at its baseline's upper bound plus the jump (monitoring.signals.refusal_signal).
            site_figure("refusal_rate_threshold", site): None
            if ceiling is None
            else ceiling + settings.monitor_refusal_jump,
        }
    figures["max_site_refusal_rate"] = max((v for v in refusal_rates if v is not None), default=None)
    return {name: float(value) for name, value in figures.items() if isinstance(value, int | float)}


def verdict_snapshot(
    judged: WindowVerdict, settings: Settings, timestamp: datetime | None, versions: dict[str, str] | None = None
) -> Any:
    """An Evidently snapshot of the verdict: its figures as ``MeanValue`` metrics, the fired signals
    and the model and data versions in the metadata, verdict and severity as tags. Built-in metrics
    only, so the Evidently UI (which does not import medops) can load and chart it."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue

    frame = pd.DataFrame([verdict_figures(judged, settings)])
    metadata = {
        "verdict": str(judged.verdict),
        "severity": str(judged.severity or "none"),
        "retrain": str(judged.retrain).lower(),
        "scope": judged.scope,
        "sites": ", ".join(judged.alerting_sites) or "none",
        "signals": judged.fired_text(),
        **(versions or {}),
    }
    severity = [str(judged.severity)] if judged.severity else []
    tags = ["verdict", str(judged.verdict), *severity, *judged.alerting_sites]
    definition = DataDefinition(numerical_columns=list(frame.columns))
    return Report([MeanValue(column=name) for name in frame.columns], metadata=metadata, tags=tags).run(
        Dataset.from_pandas(frame, data_definition=definition), None, timestamp=timestamp
    )


def report_metadata(settings: Settings, reference: Reference) -> dict[str, str]:
    """What every report of a window names: the model version watched, its data version, and its MLflow page."""
    from medops.core import links

    return {
        "model_version": str(reference.model_version),
        "data_version": reference.data_version,
        "model_version_url": links.mlflow_model_version(settings, settings.model_name, reference.model_version),
    }


def add_to_workspace(
    settings: Settings, snapshots: list[tuple[str, Any]], *, name: str, sites: list[str] | tuple[str, ...] = ()
) -> tuple[str | None, list[str]]:
    """Add a window's snapshots (``(kind, snapshot)``, None skipped) to the Evidently workspace
    project of ``settings.model_name``, created when missing, and write its dashboard with a tab
    for each of ``sites`` and every site seen before. Returns the project id and the snapshot ids."""
    present = [(kind, snapshot) for kind, snapshot in snapshots if snapshot is not None]
    if not present:
        return None, []
    from evidently.ui.workspace import Workspace

    from monitoring.dashboard import save_dashboard

    settings.evidently_workspace.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(str(settings.evidently_workspace))
    found = workspace.search_project(settings.model_name)
    description = f"Drift and performance of the served model {settings.model_name}"
    project = found[0] if found else workspace.create_project(settings.model_name, description=description)
    save_dashboard(workspace, project.id, sites)
    ids = [
        str(workspace.add_run(project.id, snapshot, include_data=False, name=f"{kind} {name}").id)
        for kind, snapshot in present
    ]
    return str(project.id), ids


def log_to_mlflow(
    directory: Path, settings: Settings, *, model_version: str, stamp: str, result: MonitoringResult
) -> str:
    """Log the report folder to the model version's run under ``monitoring/<stamp>/`` and tag the version."""
    from pipelines import model_registry

    client = model_registry.client(settings)
    version = client.get_model_version(settings.model_name, str(model_version))
    if not version.run_id:
        raise RuntimeError(f"model version {model_version} has no MLflow run to log reports to")
    client.log_artifacts(version.run_id, str(directory), artifact_path=f"monitoring/{directory.name}")
    tags = {
        "monitoring_last_verdict": result.verdict,
        "monitoring_last_report": f"monitoring/{directory.name}",
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


def _save_window_state(
    settings: Settings, window_end: datetime, result: MonitoringResult, traffic: dict[str, Any]
) -> None:
    """Where the next window starts, and this window's per-site traffic: the next window's refusal baseline."""
    state = {
        "window_end": window_end.isoformat(),
        "last_report": result.report_dir,
        "verdict": result.verdict,
        "traffic": traffic,
    }
    write_atomically(_state_path(settings), json.dumps(state, indent=1) + "\n")


# The verdicts that alert, and how their alert's title starts.
ALERT_TITLES = {
    Verdict.DRIFT: "Drift in what",
    Verdict.PERFORMANCE_DROP: "Performance drop of",
    Verdict.DATA_QUALITY: "Data-quality incident in what",
}


def next_step(data: dict[str, Any], settings: Settings) -> str:
    """What the platform does next about a verdict, in one sentence for on-call people."""
    if data["verdict"] == Verdict.DATA_QUALITY and not data.get("retrain"):
        return (
            "Nothing automatic: inputs are broken, and a model must not learn from them. "
            "Fix the named fields at the site (unit, range, missing values)."
        )
    if not data.get("retrain"):
        return "No retraining (severity warning): watch the next windows; retraining starts when this turns critical."
    from pipelines.retraining import in_cooldown

    left = in_cooldown(settings)
    if left is not None:
        hours = left.total_seconds() / 3600
        return (
            f"Retraining requested but inside the {settings.retrain_cooldown_hours:g} h cooldown "
            f"({hours:.1f} h left): the next window that still shows this retrains."
        )
    if settings.require_approval:
        return (
            "Retraining scheduled (train_model); its promotion waits for approval by a person "
            "(MEDOPS_REQUIRE_APPROVAL)."
        )
    return "Retraining scheduled (train_model via medops/drift); the new model is promoted if it passes the gate."


def alert_for_result(result: MonitoringResult | dict[str, Any], settings: Settings) -> dict[str, Any] | None:
    """Alert on-call people about ``drift``, ``performance_drop`` or ``data_quality``; nothing otherwise.

    The alert names the sites, every fired signal with its figures, the severity, what the platform
    does next and the report. Deduplication keys on verdict, sites, severity and the names of the
    fired signals: the figures change every run, the incident does not.
    """
    from medops.core.alerts import send_alert

    data = result.to_dict() if isinstance(result, MonitoringResult) else result
    if data["verdict"] not in ALERT_TITLES:
        return None
    sites = data.get("sites") or []
    where = f"at {', '.join(sites)}" if sites else "across sites"
    what = ALERT_TITLES[data["verdict"]]
    receives = "" if data["verdict"] == Verdict.PERFORMANCE_DROP else " receives"
    title = f"{what} {settings.model_name} v{data.get('model_version')}{receives} {where}"
    fired = data.get("signals") or []
    lines = [f"- {signal['scope']}: {signal['name']} ({signal['severity']}): {signal['text']}" for signal in fired]
    details = "\n".join(["Signals:", *lines, f"Next: {next_step(data, settings)}"])
    names = sorted({signal["name"] for signal in fired})
    outcome = send_alert(
        title,
        data["verdict"],
        data["drifted_columns"],
        ", ".join(sites) or None,
        data.get("report_url") or data.get("report"),
        settings,
        severity=data.get("severity") or "warning",
        details=details,
        dedup_key=json.dumps([names, bool(data.get("retrain"))]),
    )
    return asdict(outcome)
