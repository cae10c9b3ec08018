"""DAG integrity: every DAG file imports cleanly, carries its contract, and stays light to parse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DAGS_FOLDER = Path(__file__).resolve().parents[1] / "dags"
DAG_FILES = sorted(p for p in DAGS_FOLDER.glob("*.py") if not p.name.startswith("_"))
EXPECTED = {"ingest_data", "train_model", "deploy_model", "monitor_drift"}
HEAVY = ("pandas", "numpy", "sklearn", "mlflow", "bentoml", "evidently", "dvc", "shap", "pandera")


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_FOLDER))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_contract_dag_ids_are_present(dagbag):
    present = set(dagbag.dag_ids)
    assert {"ingest_data", "train_model"} <= present
    assert present <= EXPECTED, f"unexpected DAGs: {present - EXPECTED}"


def test_every_dag_has_docs_tags_owner_retries_and_failure_alert(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.doc_md and len(dag.doc_md) > 80, dag_id
        assert "medops" in dag.tags, dag_id
        for task in dag.tasks:
            assert task.owner and task.owner != "airflow", f"{dag_id}.{task.task_id} owner"
            if task.task_type != "ApprovalOperator":  # asking a person twice is not a retry
                assert task.retries >= 1, f"{dag_id}.{task.task_id} retries"
            assert task.on_failure_callback, f"{dag_id}.{task.task_id} on_failure_callback"


def test_schedules_follow_the_loop(dagbag):
    ingest, train = dagbag.dags["ingest_data"], dagbag.dags["train_model"]
    assert "medops/landing" in str(ingest.timetable.asset_condition)
    assert (
        {"medops/data", "medops/drift"} <= {a.name for a in train.timetable.asset_condition.iter_assets().values()}
        if hasattr(train.timetable.asset_condition, "iter_assets")
        else "medops/drift" in str(train.timetable)
    )
    publish = ingest.get_task("publish")
    assert [o.name for o in publish.outlets] == ["medops/data"]
    assert [o.name for o in train.get_task("promote").outlets] == ["medops/champion"]


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_imports_nothing_heavy_at_top_level(dag_file: Path):
    """Importing a DAG file (as the DAG processor does) must not pull in the ML stack."""
    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]);"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; print('HEAVY=' + ','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(dag_file)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    heavy = [line for line in result.stdout.splitlines() if line.startswith("HEAVY=")][-1][len("HEAVY=") :]
    assert heavy == "", f"{dag_file.name} imports at parse time: {heavy}"


def test_every_trigger_form_submits_with_its_defaults(dagbag):
    """Airflow's form makes a typed field required unless its type allows null; a required field
    whose default is blank disables the Trigger button. Every default must also pass its schema."""
    for dag_id, dag in dagbag.dags.items():
        for name, param in dag.params.items():
            schema = param.schema
            types = schema.get("type")
            types = types if isinstance(types, list) else [types]
            if param.value in (None, ""):
                assert "null" in types, f"{dag_id}: blank default of {name!r} makes the form unsubmittable"
            param.resolve(param.value)  # raises ParamValidationError if the default breaks the schema
            assert param.description, f"{dag_id}: {name!r} has no help text"


def test_training_goes_to_the_train_queue_and_the_rest_to_the_default_one(dagbag):
    """The cluster profile's workers route by queue; LocalExecutor ignores it, so this costs standalone nothing."""
    queues = {task.task_id: task.queue for task in dagbag.get_dag("train_model").tasks}
    assert queues["fit"] == queues["search"] == "train"
    assert {queue for task_id, queue in queues.items() if task_id not in ("fit", "search")} == {"default"}


def test_model_search_fans_out_one_mapped_task_per_family_and_reduces(dagbag):
    dag = dagbag.get_dag("train_model")
    search = dag.get_task("search")
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    assert isinstance(search, MappedOperator)
    assert "candidate_families" in search.upstream_task_ids
    assert dag.get_task("choose").upstream_task_ids == {"search"}
    assert "choose" in dag.get_task("fit").upstream_task_ids


def test_nothing_after_the_train_queue_reads_a_workers_disk(dagbag):
    """fit logs its own MLflow run (no work folder handed to another task): register takes its XCom."""
    dag = dagbag.get_dag("train_model")
    assert "log_run" not in dag.task_ids
    assert dag.get_task("register").upstream_task_ids == {"plan", "fit"}
