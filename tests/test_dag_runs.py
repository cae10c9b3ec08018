"""`dag.test()` runs of ingest_data and train_model on a temporary MEDOPS_HOME, and retraining plans."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from medops.core.settings import REPO_ROOT, Settings
from pipelines import data_registry, model_registry
from pipelines.data import seed_frame
from pipelines.retraining import in_cooldown, plan_training


def _load_dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    from tests.test_dags import DAGS_FOLDER

    bag = DagBag(dag_folder=str(DAGS_FOLDER / f"{dag_id}.py"))
    assert not bag.import_errors
    return bag.dags[dag_id]


def _states(run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


def test_ingest_data_dag_versions_landed_files_and_keeps_bad_ones(airflow_db, registry_home: Settings):
    landing = registry_home.landing_dir
    landing.mkdir(parents=True, exist_ok=True)
    good = seed_frame().iloc[:25].copy()
    good["mean_radius"] += 0.21
    good.to_csv(landing / "good.csv", index=False)
    scan = bytes(range(256)) * 4
    (landing / "scan.csv").write_bytes(scan)

    run = _load_dag("ingest_data").test()

    assert str(run.state) == "success"
    assert _states(run)["publish"] == "success"
    assert data_registry.list_versions(registry_home) == ["data-v1", "data-v2"]
    # the refused file was moved, not copied, into quarantine, under its hash
    quarantined = list(registry_home.quarantine_dir.glob(f"*/{hashlib.sha256(scan).hexdigest()}.csv"))
    assert len(quarantined) == 1 and quarantined[0].read_bytes() == scan
    assert sorted(p.name for p in (landing / "processed").iterdir()) == ["good.csv"]
    assert not (landing / "scan.csv").exists()


def test_ingest_data_dag_with_nothing_new_skips_publishing(airflow_db, registry_home: Settings):
    run = _load_dag("ingest_data").test()
    assert str(run.state) == "success"
    assert _states(run)["publish"] == "skipped"


def test_train_model_dag_trains_gates_and_promotes(airflow_db, registry_home: Settings):
    run = _load_dag("train_model").test(run_conf={"families": ["logistic_regression"]})

    states = _states(run)
    assert str(run.state) == "success", states
    assert states["promote"] == "success" and states["await_approval"] == "skipped"
    assert [states[step] for step in ("plan", "fit", "register")] == ["success"] * 3
    assert not list((registry_home.home / "training").iterdir())  # the work folder went with the fit
    champion = model_registry.champion_version(registry_home)
    assert champion is not None
    tags = model_registry.version_tags(champion, registry_home)
    assert tags["data_version"] == "data-v1" and tags["gate_decision"] == "promoted"
    assert tags["airflow_run_id"] == run.run_id
    mlflow_run = model_registry.client(registry_home).get_run(_run_of(champion, registry_home))
    assert mlflow_run.data.tags["airflow_run_url"].startswith(f"http://127.0.0.1:{registry_home.airflow_port}/dags/")
    experiment = model_registry.client(registry_home).get_experiment(mlflow_run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow opens model training
    # A manual run makes no data version, so it announces none (else it would schedule itself again).
    assert _data_events(run) == []


def test_a_fresh_task_process_logs_no_skops_warning_and_mlflow_output_as_info(airflow_db, registry_home: Settings):
    """train_model in a new interpreter with every warning shown, as a task process starts.

    Importing skops there looks scipy's ufuncs up in Airflow's deprecated-name shims: 1,160
    DeprecatedImportWarnings per task unless model I/O keeps them quiet; and MLflow prints
    "Created version" on stderr, which a task logs at ERROR level.
    """
    script = (
        "from airflow.dag_processing.dagbag import DagBag\n"
        "dag = DagBag(dag_folder='dags/train_model.py').dags['train_model']\n"
        "print('run state:', dag.test(run_conf={'families': ['logistic_regression']}).state)\n"
    )
    from airflow.configuration import conf

    # The session's metadata DB holds values encrypted with this process's Fernet key.
    env = {**os.environ, "AIRFLOW__CORE__FERNET_KEY": conf.get("core", "fernet_key")}
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    output = done.stdout + done.stderr
    assert "run state: success" in done.stdout, output[-3000:]
    warned = [line for line in output.splitlines() if "DeprecatedImportWarning" in line]
    assert not warned, f"{len(warned)} lines like {warned[0]}"
    created = [line for line in output.splitlines() if "Created version '1'" in line]
    assert created and not any("Created version" in line for line in done.stderr.splitlines()), created
    assert all("[info" in line for line in created), created


def _run_of(version: str, settings: Settings) -> str:
    return model_registry.client(settings).get_model_version(settings.model_name, version).run_id


def _data_events(run) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        events = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetEvent.source_run_id == run.run_id, AssetModel.name == "medops/data")
            .all()
        )
        return [dict(event.extra or {}) for event in events]


def test_train_model_dag_stops_at_the_gate(airflow_db, registry_home: Settings, capfd):
    # a stricter floor than the protocol's needs no approval; the lower bound of ROC AUC (0.9988) misses it
    run = _load_dag("train_model").test(run_conf={"families": ["logistic_regression"], "roc_auc_lower": 0.9999})
    states = _states(run)
    assert states["fit"] == states["register"] == "success" and states["promote"] == "skipped"
    assert model_registry.champion_version(registry_home) is None
    # register's log ends with what it did, where to look and what to do next
    out = capfd.readouterr().out
    summary = out[out.index("── summary: model version 1") :]
    assert "gate REFUSED" in summary and "MLflow run: http://" in summary and "/models/" in summary
    assert "next: retrain on more data" in summary


def test_a_data_version_retraining_made_is_an_asset_event_naming_its_run(airflow_db, registry_home, monkeypatch):
    from pipelines import retraining

    plan = retraining.plan_training
    monkeypatch.setattr(
        retraining, "plan_training", lambda settings, **kw: plan(settings, **kw) | {"new_data_version": "data-v1"}
    )
    run = _load_dag("train_model").test(run_conf={"families": ["logistic_regression"], "roc_auc_lower": 0.9999})
    assert _states(run)["plan"] == "success"
    assert _data_events(run) == [{"data_version": "data-v1", "origin": "feedback", "trained_by": run.run_id}]


@dataclass(frozen=True)
class _AssetKey:  # Airflow keys triggering events by the asset's unique key, which has a name
    name: str


def _event(name: str, **extra):
    return _AssetKey(name), [SimpleNamespace(extra=extra)]


def test_plan_from_a_data_announcement(registry_home: Settings):
    key, events = _event("medops/data", data_version="data-v1")
    assert plan_training(registry_home, triggering_events={key: events}) == {
        "trigger": "data",
        "data_version": "data-v1",
        "needs_approval": False,
    }


def test_drift_retraining_respects_cooldown_and_approval(registry_home: Settings, monkeypatch):
    monkeypatch.setattr("pipelines.retraining.version_feedback", lambda settings: None)
    settings = registry_home.model_copy(update={"require_approval": True})
    key, events = _event("medops/drift", verdict="drift")

    first = plan_training(settings, triggering_events={key: events})
    assert first == {"trigger": "drift", "data_version": "data-v1", "needs_approval": True}
    assert plan_training(settings, triggering_events={key: events}) is None  # inside the cooldown
    left = in_cooldown(settings)
    assert timedelta(hours=5, minutes=59) < left <= timedelta(hours=6)
    assert in_cooldown(settings, now=datetime.now(UTC) + timedelta(hours=6, seconds=1)) is None
    # a manual run is never held back by the cooldown
    assert plan_training(settings)["trigger"] == "manual"


@pytest.mark.parametrize("hours", [0.0])
def test_zero_cooldown_allows_back_to_back_retraining(registry_home: Settings, monkeypatch, hours):
    monkeypatch.setattr("pipelines.retraining.version_feedback", lambda settings: None)
    settings = registry_home.model_copy(update={"retrain_cooldown_hours": hours})
    key, events = _event("medops/drift")
    assert plan_training(settings, triggering_events={key: events}) is not None
    assert plan_training(settings, triggering_events={key: events}) is not None
