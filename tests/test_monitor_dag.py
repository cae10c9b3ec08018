"""The monitoring run (reports on disk, Evidently workspace, MLflow) and the monitor_drift DAG.

One platform per module: a data registry with the seed as ``data-v1`` and a tiny champion model
trained on its training rows, tagged with that data version and logged with its reference the way
training stores it (``write_reference`` under ``reference/``), so monitoring reads it the real way.
Each test starts from an empty prediction log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from medops.core.settings import REPO_ROOT, Settings, get_settings, reset_settings
from pipelines.schema import FEATURES, LABEL, POSITIVE

# Loading the model scans Airflow's modules (skops), which warns about each deprecated name it touches.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:skops.io._utils")

DAG_FILE = REPO_ROOT / "dags" / "monitor_drift.py"
# Training tunes the operating threshold for sensitivity; so does this test's champion (tagged as training tags it).
THRESHOLD = 0.2
SIZE_FEATURES = [name for name in FEATURES if any(size in name for size in ("radius", "perimeter", "area"))]


def register_champion(settings: Settings) -> str:
    """A logistic regression on data-v1's training rows with its stored reference, registered and aliased @champion."""
    import mlflow
    import mlflow.sklearn
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipelines import model_registry
    from pipelines.data_registry import load_version_frame
    from pipelines.holdout import split_by_row_key

    train, holdout = split_by_row_key(load_version_frame("data-v1", settings))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(train[list(FEATURES)], train[LABEL])
    experiment = model_registry.ensure_experiment(settings, "monitoring-tests")
    with mlflow.start_run(experiment_id=experiment), tempfile.TemporaryDirectory() as tmp:
        reference = model_registry.write_reference(model, train, holdout, Path(tmp), seed=settings.seed)
        mlflow.log_artifacts(str(reference), artifact_path=model_registry.REFERENCE)
        info = mlflow.sklearn.log_model(model, name="model", pip_requirements=["scikit-learn"])
    version = model_registry.register_trusted(f"models:/{info.model_id}", settings)  # as training registers
    model_registry.tag_version(version, {"data_version": "data-v1", "threshold": f"{THRESHOLD:.6f}"}, settings)
    model_registry.set_champion(version, settings)
    return version


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory):
    from pipelines.data_registry import init_registry

    home = tmp_path_factory.mktemp("monitoring") / "medops-home"
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("MEDOPS_"):
                patch.delenv(name)
        patch.setenv("MEDOPS_HOME", str(home))
        reset_settings()
        settings = get_settings()
        init_registry(settings)
        version = register_champion(settings)
        model = _load(settings, version)
        yield SimpleNamespace(settings=settings, version=version, model=model)
    reset_settings()


def _load(settings: Settings, version: str):
    from pipelines import model_registry

    return model_registry.load_model(version, settings)


@pytest.fixture
def monitored(platform) -> SimpleNamespace:
    """The module's platform with an empty prediction log, no reports, no alert outbox and no monitoring state."""
    settings = platform.settings
    reset_settings()  # DAG tasks call get_settings(): it must read this module's MEDOPS_HOME
    assert get_settings().home == settings.home
    for folder in (
        settings.predictions_dir,
        settings.reports_dir,
        settings.home / "state",
        settings.home / "alerts",
        settings.evidently_workspace,
    ):
        shutil.rmtree(folder, ignore_errors=True)
    return platform


def log_traffic(
    platform, rows: int, site: str, *, seed: int, scale: float = 1.0, at: datetime | None = None, feedback: int = 0
) -> pd.DataFrame:
    """Append served predictions (scored by the champion) to the log, and feedback for the first rows."""
    from pipelines.data import seed_frame
    from pipelines.prediction_log import PREDICTION_COLUMNS, feedback_dir, hash_encounter_id, predictions_log_dir

    settings = platform.settings
    cases = seed_frame().sample(rows, replace=True, random_state=seed).reset_index(drop=True)
    cases[SIZE_FEATURES] *= scale
    positive = list(platform.model.classes_).index(POSITIVE)
    probability = platform.model.predict_proba(cases[list(FEATURES)])[:, positive]
    at = at or datetime.now(UTC) - timedelta(minutes=5)
    encounters = [f"enc-{site}-{seed}-{i}" for i in range(rows)]
    log = cases[list(FEATURES)].assign(
        logged_at=[at + timedelta(milliseconds=i) for i in range(rows)],
        request_id=f"req-{seed}",
        model_name=settings.model_name,
        model_version=platform.version,
        site_id=site,
        encounter_hash=[hash_encounter_id(e, settings) for e in encounters],
        probability_malignant=probability,
        label=np.where(probability >= THRESHOLD, "malignant", "benign"),
    )
    path = predictions_log_dir(settings) / f"predictions-{datetime.now(UTC):%Y%m%d}-{os.getpid()}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = log[list(PREDICTION_COLUMNS)].assign(logged_at=[stamp.isoformat() for stamp in log["logged_at"]])
    rows.to_csv(path, mode="a", header=not path.exists(), index=False)
    if feedback:
        folder = feedback_dir(settings)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"feedback-{at:%Y%m%d}-{os.getpid()}.csv"
        labels = pd.DataFrame(
            {
                "logged_at": at.isoformat(),
                "encounter_hash": log["encounter_hash"][:feedback],
                LABEL: cases[LABEL][:feedback],
            }
        )
        labels.to_csv(path, mode="a", header=not path.exists(), index=False)
    return log


# The monitoring run ---------------------------------------------------------------------------------
def test_drift_run_writes_reports_workspace_and_mlflow(monitored):
    from evidently.ui.workspace import Workspace

    from monitoring.reports import run_monitoring
    from pipelines import model_registry

    settings = monitored.settings
    log = log_traffic(monitored, 300, "site-x", seed=1, scale=1.25, feedback=120)
    log_traffic(monitored, 260, "site-y", seed=2)
    result = run_monitoring(settings)

    assert result.verdict == "drift" and result.severity == "critical" and result.retrain
    assert result.sites == ["site-x"] and result.scope in ("site-x", "window")  # ties go to the window
    assert "mean_radius" in result.drifted_columns
    fired = {(signal["scope"], signal["name"]) for signal in result.signals}
    assert ("site-x", "important_feature_drift") in fired
    assert not any(scope == "site-y" for scope, _ in fired)
    assert result.site_verdicts["site-y"]["verdict"] == "no_drift"
    assert result.site_verdicts["site-x"]["verdict"] == "drift"
    assert result.estimated_performance["sensitivity"] is not None
    assert result.n_current == 560 and result.model_version == monitored.version and result.data_version == "data-v1"
    assert result.performance["n_labelled"] == 120
    outbox = result.alert.pop("outbox")  # no channel configured: the alert waits in the outbox
    assert Path(outbox).is_file() and Path(outbox).parent == settings.home / "alerts" / "outbox"
    assert result.alert == {
        "sent": False,
        "deduplicated": False,
        "channels": {"webhook": "not configured", "email": "not configured"},
    }
    assert result.asset_extra() == {
        "verdict": "drift",
        "severity": "critical",
        "drifted_columns": result.drifted_columns,
        "sites": ["site-x"],
        "signals": sorted({name for _, name in fired}),
        "report": result.report_url,
    }

    report_dir = Path(result.report_dir)
    assert report_dir.parent == settings.reports_dir
    names = sorted(p.name for p in report_dir.iterdir())
    assert names == [
        "drift.html",
        "drift.json",
        "performance.html",
        "performance.json",
        "summary.json",
        "verdict.html",
        "verdict.json",
    ]
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["drift"]["per_site"]["site-x"]["verdict"] == "drift"
    assert summary["drift"]["per_site"]["site-y"]["verdict"] == "no_drift"
    assert summary["verdict_signals"]["sites"]["site-x"]["verdict"] == "drift"
    assert summary["verdict_signals"]["sites"]["site-y"]["verdict"] == "no_drift"
    verdict = json.loads((report_dir / "verdict.json").read_text())
    charted = {metric["config"]["column"]: metric["value"] for metric in verdict["metrics"]}
    assert charted["verdict_code"] == 2 and charted["severity_code"] == 2 and charted["retrain"] == 1
    assert charted["estimated_sensitivity"] == pytest.approx(result.estimated_performance["sensitivity"])
    everything = "".join(p.read_text() for p in report_dir.iterdir())
    assert not any(h in everything for h in log["encounter_hash"][:50])  # no patient identifiers

    workspace = Workspace(str(settings.evidently_workspace))
    (project,) = workspace.search_project(settings.model_name)
    assert str(project.id) == result.workspace_project_id
    assert sorted(map(str, workspace.list_runs(project.id))) == sorted(result.snapshot_ids)
    assert result.report_url == (
        f"http://127.0.0.1:{settings.evidently_port}/projects/{project.id}/reports/{result.snapshot_ids[0]}"
    )

    client = model_registry.client(settings)
    run_id = client.get_model_version(settings.model_name, monitored.version).run_id
    assert result.mlflow_run_id == run_id
    logged = {f.path for f in client.list_artifacts(run_id, f"monitoring/{report_dir.name}")}
    assert (
        f"monitoring/{report_dir.name}/drift.html" in logged and f"monitoring/{report_dir.name}/summary.json" in logged
    )
    tags = model_registry.version_tags(monitored.version, settings)
    assert (
        tags["monitoring_last_verdict"] == "drift" and tags["monitoring_last_report"] == f"monitoring/{report_dir.name}"
    )

    again = run_monitoring(settings)  # the window starts where the last report's ended: nothing new
    assert again.verdict == "insufficient_data" and again.n_current == 0 and again.report is None
    assert len(list(settings.reports_dir.iterdir())) == 1
    (project,) = workspace.search_project(settings.model_name)  # found by name, not created twice


def test_steady_traffic_is_no_drift_without_alert(monitored):
    from monitoring.reports import run_monitoring

    log_traffic(monitored, 400, "site-y", seed=3)
    result = run_monitoring(monitored.settings)
    assert result.verdict == "no_drift" and result.sites == [] and result.alert is None
    assert result.prediction_drift is False
    assert Path(result.report).name == "drift.html"


def test_realized_performance_judges_the_latest_labels_including_earlier_windows(monitored):
    from monitoring.reports import run_monitoring

    settings = monitored.settings.model_copy(update={"monitor_label_window": 150})
    start = datetime.now(UTC) - timedelta(hours=1)
    log_traffic(monitored, 200, "site-y", seed=6, at=start - timedelta(hours=2), feedback=200)
    log_traffic(monitored, 300, "site-y", seed=7, feedback=40)
    result = run_monitoring(settings, since=start, alert=False)
    assert result.n_current == 300 and result.performance["n_labelled"] == 40  # the window's own labels
    # Judged on the latest 150: the window's 40 and the 110 latest of the earlier window's 200.
    assert result.realized_performance["labelled"] == 150


def test_a_short_window_waits_for_more_rows(monitored):
    from monitoring.reports import run_monitoring

    settings = monitored.settings
    log_traffic(monitored, 150, "site-y", seed=4, at=datetime.now(UTC) - timedelta(minutes=30))
    first = run_monitoring(settings)
    assert first.verdict == "insufficient_data" and first.n_current == 150 and first.report is None
    assert "fewer than 200" in first.note and not settings.reports_dir.exists()
    log_traffic(monitored, 100, "site-y", seed=5)
    second = run_monitoring(settings)
    assert second.n_current == 250 and second.verdict == "no_drift"


def test_a_refusal_jump_is_a_data_quality_incident_that_never_retrains(monitored):
    from monitoring.reports import run_monitoring
    from pipelines.prediction_log import log_refusal

    settings = monitored.settings
    log_traffic(monitored, 300, "site-y", seed=7)
    log_traffic(monitored, 250, "site-z", seed=8)
    refused_at = (datetime.now(UTC) - timedelta(minutes=5)).timestamp()
    log_refusal(settings, [("site-z", "mean_radius", "out_of_range", 120, 120)], now=refused_at)
    result = run_monitoring(settings)

    assert result.verdict == "data_quality" and result.severity == "critical" and not result.retrain
    assert result.sites == ["site-z"]
    (signal,) = [s for s in result.signals if s["name"] == "refusal_rate"]
    assert signal["scope"] == "site-z" and signal["figures"]["refused"] == 120
    assert signal["figures"]["fields"] == {"mean_radius": {"out_of_range": 120}}
    state = json.loads((settings.home / "state" / "monitoring.json").read_text())
    # The next window's baseline: site-y's calm traffic, not site-z's incident.
    assert state["traffic"]["site-y"]["scored"] == 300 and "site-z" not in state["traffic"]


# The DAG ----------------------------------------------------------------------------------------------
def test_dag_parses_with_owner_retries_tags_and_failure_alert():
    from airflow.dag_processing.dagbag import DagBag

    from medops.orchestration import MedopsNotifier

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    dag = bag.dags["monitor_drift"]
    assert set(dag.tags) == {"medops", "monitoring"}
    assert dag.doc_md and "monitor_drift" in dag.doc_md
    assert set(dag.params) == {"since", "alert"}
    assert {t.task_id for t in dag.tasks} == {"check_drift", "alert_on_call", "drifted", "announce_drift"}
    for task in dag.tasks:
        assert task.owner == "ml-platform"
        assert task.retries >= 1
        assert any(isinstance(callback, MedopsNotifier) for callback in task.on_failure_callback)
    (announce,) = [t for t in dag.tasks if t.task_id == "announce_drift"]
    assert [asset.name for asset in announce.outlets] == ["medops/drift"]


def test_dag_file_imports_nothing_heavy():
    code = f"""
import sys, runpy
runpy.run_path({str(DAG_FILE)!r})
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {{'pandas', 'sklearn', 'mlflow', 'evidently', 'scipy'}})
print("HEAVY " + ",".join(heavy))
"""
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert "HEAVY \n" in found.stdout + "\n", found.stdout


def test_dag_test_run_reports_and_emits_the_drift_asset(airflow_db, monitored):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    settings = monitored.settings
    log_traffic(monitored, 300, "site-x", seed=6, scale=1.3)
    run = DagBag(dag_folder=str(DAG_FILE)).dags["monitor_drift"].test()

    assert str(run.state) == "success"
    assert {ti.task_id: str(ti.state) for ti in run.get_task_instances()} == {
        "check_drift": "success",
        "alert_on_call": "success",
        "drifted": "success",
        "announce_drift": "success",
    }
    with create_session() as session:
        events = session.query(AssetEvent).filter(AssetEvent.source_run_id == run.run_id).all()
        (extra,) = [event.extra for event in events]
    assert extra["verdict"] == "drift" and extra["sites"] == ["site-x"]
    assert "mean_radius" in extra["drifted_columns"]
    assert extra["report"].startswith(f"http://127.0.0.1:{settings.evidently_port}/projects/")
    (report_dir,) = settings.reports_dir.iterdir()
    assert (report_dir / "drift.html").is_file()
    # No channel is configured here: the drift alert waits in the outbox rather than vanishing.
    (waiting,) = (settings.home / "alerts" / "outbox").glob("*.json")
    assert json.loads(waiting.read_text())["report_url"] == extra["report"]
    assert waiting.stat().st_mode & 0o777 == 0o600
