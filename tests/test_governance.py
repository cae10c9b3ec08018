"""Governance end to end on real training: the interval gate through train_model, the protocol's
approvals (command line and Airflow's Required actions), the audit trail's CLI, the model card and
lineage from a served prediction back to the exact rows."""

from __future__ import annotations

import getpass
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_fixtures import auth, records, service_app, serving_home
from starlette.testclient import TestClient
from typer.testing import CliRunner

from medops.app.cli import app
from medops.core import audit
from medops.core.settings import Settings
from pipelines import governance, model_registry
from pipelines.data import seed_frame
from pipelines.model_card import stored_card
from pipelines.schema import DATA_COLUMNS

runner = CliRunner()
FAMILY = ["logistic_regression"]


def _rewrite_remote(settings: Settings) -> None:
    """Point a copied registry at its own DVC remote (as conftest's registry_home does)."""
    config = settings.registry_dir / ".dvc" / "config"
    text = config.read_text()
    old = [line.split("=", 1)[1].strip() for line in text.splitlines() if line.strip().startswith("url")][0]
    config.write_text(text.replace(old, settings.dvc_remote_url))


def test_point_estimates_that_pass_are_refused_on_the_lower_bound_and_a_small_site_is_not_enough_evidence(
    registry_home: Settings, tmp_path: Path
):
    """A new site sends 40 cases (data-v2). Floor 0.95 on sensitivity's lower bound, the old point rule's
    number: the candidate finds every cancer (point sensitivity 1.000 >= 0.95, ROC AUC >= 0.97, what the
    former gate asked), but 49 malignant hold-out rows cannot show 0.95 at 95 % confidence: refused.
    The new site's few hold-out rows are reported as not enough evidence, never passed silently."""
    from pipelines.ingest import ingest_file
    from pipelines.train import promote, train_model

    batch = seed_frame().iloc[:40].copy()
    batch["mean_radius"] += 0.37
    batch["site_id"] = "site-d"
    batch.to_csv(tmp_path / "site-d.csv", index=False)
    assert ingest_file(tmp_path / "site-d.csv", registry_home, actor="dr.okafor").version == "data-v2"

    result = train_model(registry_home, families=FAMILY, thresholds={"sensitivity_lower": 0.95}, actor="tester")
    overall = result.gate.overall.candidate
    assert result.approval_reasons == []  # a stricter floor needs nobody's approval
    assert overall.sensitivity.value >= 0.95 and overall.roc_auc.value >= 0.97  # the point-estimate gate's rule
    assert overall.sensitivity.lower < 0.95
    assert not result.gate.passed
    failed = [(check.scope, check.rule) for check in result.gate.checks if check.status == "failed"]
    assert failed == [("overall", "sensitivity_lower")]
    site = result.gate.sites["site-d"]
    assert site.status == "not_enough_evidence" and 0 < site.rows and site.malignant < 10
    assert any(reason.startswith("site-d: not enough evidence") for reason in result.gate.reasons)

    assert not promote(result, registry_home)
    assert model_registry.champion_version(registry_home) is None
    tags = model_registry.version_tags(result.model_version, registry_home)
    assert tags["gate_passed"] == "false" and "sensitivity" in tags["gate_reason"]
    assert tags["holdout_malignant"] == str(result.holdout["malignant"])
    entries = audit.entries(registry_home)
    assert [(e.action, e.actor) for e in entries] == [
        ("data_version", "medops-scheduler"),  # the seed, when the registry was made
        ("data_version", "dr.okafor"),
        ("training_run", "tester"),
        ("gate_decision", "tester"),
    ]
    figures = entries[-1].details
    assert figures["passed"] is False and figures["sites"]["site-d"]["status"] == "not_enough_evidence"
    assert figures["overall"]["sensitivity"]["lower"] == pytest.approx(overall.sensitivity.lower, abs=1e-4)
    assert entries[-1].links["report"] == f"runs:/{result.run_id}/gate/decision.json"
    # a stricter threshold than the protocol's is judged under it, and the card says why it was refused
    markdown, html = stored_card(result.model_version, registry_home)
    assert "FAILED under modification protocol v1" in markdown and "<td>site-d</td>" in html
    assert "- Not enough evidence at: site-d." in markdown


def test_a_lowered_threshold_needs_a_named_approval_on_the_command_line_and_audit_verify_catches_edits(
    registry_home: Settings,
):
    from pipelines.train import promote

    me = getpass.getuser()
    refused = runner.invoke(app, ["train", "--family", "logistic_regression", "--sensitivity-lower", "0.8"])
    assert refused.exit_code == 1
    assert "needs a named person's approval" in refused.output and "sensitivity_lower 0.8 < protocol floor 0.85" in (
        refused.output
    )
    assert "Traceback" not in refused.output
    assert not (registry_home.mlflow_dir / "mlflow.db").exists()  # refused before any training
    placeholder = runner.invoke(
        app, ["train", "--family", "logistic_regression", "--min-sensitivity", "0.8", "--approved-by", "approver"]
    )
    assert placeholder.exit_code == 1 and "names nobody" in placeholder.output

    approved = runner.invoke(
        app,
        [
            "train",
            "--family",
            "logistic_regression",
            "--sensitivity-lower",
            "0.8",
            "--approved-by",
            "dr.house",
            "--reason",
            "pilot at one site, reviewed weekly",
            "--json",
        ],
    )
    assert approved.exit_code == 0, approved.output
    result = json.loads(approved.stdout)
    version = result["model_version"]
    assert result["promoted"] and result["gate"]["passed"]
    assert result["gate"]["thresholds"]["sensitivity_lower"] == 0.8
    assert result["gate"]["thresholds_below_protocol"] == ["sensitivity_lower 0.8 < protocol floor 0.85"]
    assert model_registry.champion_version(registry_home) == version

    actions = [(e.action, e.actor) for e in audit.entries(registry_home)]
    assert actions == [
        ("data_version", "medops-scheduler"),
        ("refusal", me),
        ("training_run", me),
        ("gate_decision", me),
        ("approval", "dr.house"),
        ("promotion", "dr.house"),
    ]
    approval = audit.entries(registry_home)[4]
    assert approval.reason == "pilot at one site, reviewed weekly" and approval.details["entered_by"] == me
    assert "sensitivity_lower 0.8 < protocol floor 0.85" in approval.details["approved"][0]
    markdown, _ = stored_card(version, registry_home)
    assert "| approval | dr.house | pilot at one site, reviewed weekly |" in markdown
    assert "**Thresholds below the protocol's floors** (a named person approved them" in markdown
    # the version keeps needing its approval: promoting it again without a person is refused
    with pytest.raises(governance.ApprovalRequired, match="needs a named person's approval"):
        promote(version, registry_home)

    shown = runner.invoke(app, ["audit", "show", "--version", version])
    assert shown.exit_code == 0 and "approval" in shown.stdout and "dr.house" in shown.stdout
    intact = runner.invoke(app, ["audit", "verify"])
    assert intact.exit_code == 0, intact.output
    assert "audit trail intact: 6 entries" in intact.stdout

    # Rewrite the training run's entry and rebuild the chain after it, head record included: the
    # chain alone looks intact, the hash kept on the MLflow run does not.
    path = audit.audit_path(registry_home)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[2]["reason"] = "manual training: nothing to see here"
    previous = lines[1]["hash"]
    for line in lines[2:]:
        line["prev_hash"] = previous
        line["hash"] = audit.entry_hash({k: v for k, v in line.items() if k != "hash"})
        previous = line["hash"]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (path.parent / audit.HEAD_FILE).write_text(json.dumps({"seq": 6, "hash": previous}) + "\n")
    assert audit.verify(registry_home).ok  # what the chain alone can see
    altered = runner.invoke(app, ["audit", "verify"])
    assert altered.exit_code == 1
    assert "ALTERED at entry seq 3" in altered.stdout and "differs from the hash recorded for it elsewhere" in (
        altered.stdout
    )
    as_json = runner.invoke(app, ["audit", "verify", "--json"])
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["first_bad_seq"] == 3


def _load_dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    from tests.test_dags import DAGS_FOLDER

    bag = DagBag(dag_folder=str(DAGS_FOLDER / f"{dag_id}.py"))
    assert not bag.import_errors
    return bag.dags[dag_id]


def _wait_for_approval_request(dag_id: str, timeout: float = 900):
    """The await_approval task instance once it waits in Required actions (AWAITING_INPUT)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with create_session() as session:
            waiting = (
                session.query(TaskInstance)
                .filter_by(dag_id=dag_id, task_id="await_approval", state=TaskInstanceState.AWAITING_INPUT)
                .one_or_none()
            )
            if waiting is not None:
                return waiting.run_id
        time.sleep(1)
    raise TimeoutError("await_approval never asked for a response")


def test_a_lowered_threshold_from_the_trigger_form_waits_for_a_named_approver(airflow_db, registry_home: Settings):
    """The form lowers a floor: the run stops in Required actions; nothing is promoted until a person
    approves there, through Airflow's own response handler; the approver's user name is recorded."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.api_fastapi.core_api.datamodels.hitl import UpdateHITLDetailPayload
    from airflow.api_fastapi.core_api.routes.public.hitl import update_hitl_detail
    from airflow.utils.session import create_session

    seen: dict = {}

    def approve_when_asked() -> None:  # dag.test() must run in the main thread: the person answers from here
        try:
            run_id = _wait_for_approval_request("train_model")
            seen["champion_while_waiting"] = model_registry.champion_version(registry_home)
            seen["version"] = model_registry.alias_version(model_registry.CHALLENGER, registry_home)
            seen["tags"] = model_registry.version_tags(seen["version"], registry_home)
            with create_session() as session:
                update_hitl_detail(
                    dag_id="train_model",
                    dag_run_id=run_id,
                    task_id="await_approval",
                    update_hitl_detail_payload=UpdateHITLDetailPayload(chosen_options=["Approve"]),
                    user=SimpleAuthManagerUser(username="dr.grey", role="admin"),
                    session=session,
                )
        except Exception as error:  # reported below; fail the waiting task so dag.test() returns
            seen["error"] = repr(error)
            from airflow.models.taskinstance import TaskInstance
            from airflow.utils.state import TaskInstanceState

            with create_session() as session:
                session.query(TaskInstance).filter_by(dag_id="train_model", task_id="await_approval").update(
                    {"state": TaskInstanceState.FAILED}
                )

    person = threading.Thread(target=approve_when_asked, daemon=True)
    person.start()
    run = _load_dag("train_model").test(run_conf={"families": FAMILY, "sensitivity_lower": 0.8})
    person.join(timeout=60)
    assert "error" not in seen, seen.get("error")
    assert seen["champion_while_waiting"] is None  # nothing promoted while it waited
    version = seen["version"]
    assert "sensitivity_lower 0.8 < protocol floor 0.85" in seen["tags"]["approval_required"]
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert str(run.state) == "success", states
    assert states["await_approval"] == states["promote"] == "success"
    assert model_registry.champion_version(registry_home) == version
    assert model_registry.version_tags(version, registry_home)["approved_by"] == "dr.grey"
    decisions = [(e.action, e.actor) for e in governance.entries_about(version, registry_home)]
    assert decisions == [("gate_decision", "dag_test"), ("approval", "dr.grey"), ("promotion", "dr.grey")]
    assert "Required actions" in governance.entries_about(version, registry_home, ("approval",))[0].reason


@pytest.mark.parametrize(
    ("response", "refusal"),
    [
        (None, "no approval response"),
        ({"chosen_options": ["Reject"], "responded_by_user": {"id": "7", "name": "dr.grey"}}, "not Approve"),
        ({"chosen_options": ["Approve"], "responded_by_user": None}, "names no Airflow user"),
        (
            {"chosen_options": ["Approve"], "responded_by_user": {"id": "1", "name": "approver"}},
            "names no Airflow user",
        ),
    ],
    ids=["none", "rejected", "timed-out", "placeholder"],
)
def test_promotion_refuses_an_approval_without_a_named_airflow_user(response, refusal):
    from medops.orchestration import approver_of

    with pytest.raises(PermissionError, match=refusal):
        approver_of(response)


def test_approver_is_the_airflow_user_name_from_the_hitl_result():
    from medops.orchestration import approver_of

    response = {
        "chosen_options": ["Approve"],
        "params_input": {},
        "responded_at": "2026-11-30T10:00:00+00:00",
        "responded_by_user": {"id": "42", "name": "dr.grey"},
    }
    assert approver_of(response) == "dr.grey"


def test_model_card_html_escapes_what_it_is_given():
    from pipelines.model_card import to_html

    page = to_html("# Card\n\n- reason <script>alert(1)</script> | x\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n", "v<1>")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<title>v&lt;1&gt;</title>" in page and "<table>" in page and "<h1>Card</h1>" in page


# a served prediction, its model card, and its lineage back to the rows ---------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, seeded_registry: Path) -> Iterator[tuple[Settings, str]]:
    """A MEDOPS_HOME with data-v1, a trained and promoted champion, and the service's ASGI app for it."""
    from pipelines.train import promote, train_model

    with serving_home(tmp_path_factory.mktemp("governance")) as settings:
        shutil.copytree(seeded_registry, settings.home, symlinks=True)
        _rewrite_remote(settings)
        result = train_model(settings, families=FAMILY)
        assert promote(result, settings)
        yield settings, result.model_version


@pytest.fixture(scope="module")
def client(served: tuple[Settings, str]) -> Iterator[TestClient]:
    settings, version = served
    with service_app(settings, version) as asgi, TestClient(asgi, raise_server_exceptions=False) as test_client:
        yield test_client


def test_model_card_is_served_as_markdown_and_as_html(client: TestClient, served: tuple[Settings, str]):
    _, version = served
    markdown = client.get("/model-card", headers=auth())
    assert markdown.status_code == 200, markdown.text
    assert markdown.headers["content-type"].startswith("text/markdown")
    assert markdown.headers["x-model-version"] == version
    text = markdown.text
    assert text.startswith(f"# Model card: breast_cancer_diagnosis v{version}")
    for section in ("Intended use", "Out-of-scope use", "Training data", "Operating threshold and why"):
        assert f"## {section}" in text
    assert "| overall | 111 | 49 | 1.000 [0.927, 1.000] (49/49) |" in text  # intervals, overall
    assert "| site-b | 35 | 13 | 1.000 [0.772, 1.000] (13/13) |" in text  # and per site
    assert "| promotion |" in text

    page = client.get("/model-card", headers=auth() | {"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text.startswith("<!doctype html>") and "<table>" in page.text
    assert "<td>1.000 [0.927, 1.000] (49/49)</td>" in page.text
    assert client.get("/model-card").status_code == 401


def test_lineage_from_a_served_prediction_restores_the_exact_training_rows(
    client: TestClient, served: tuple[Settings, str], tmp_path: Path
):
    from pipelines.data import write_frame
    from pipelines.data_registry import load_version_frame
    from pipelines.holdout import split_by_row_key
    from pipelines.prediction_log import hash_encounter_id

    settings, version = served
    encounter = "MRN-0042-visit-7"
    body = {"records": [records(1, start=12)[0] | {"encounter_id": encounter, "site_id": "site-b"}]}
    answer = client.post("/predict", json=body, headers=auth())
    assert answer.status_code == 200, answer.text

    restored = tmp_path / "rows"
    traced = runner.invoke(app, ["lineage", "--encounter-id", encounter, "--restore", str(restored)])
    assert traced.exit_code == 0, traced.output
    assert encounter not in traced.output  # only its keyed hash is ever shown
    digest = hash_encounter_id(encounter, settings)
    assert f"encounter hash {digest[:16]}" in traced.stdout
    assert f"model        breast_cancer_diagnosis v{version}" in traced.stdout
    assert "gate         passed under protocol v1" in traced.stdout
    assert "data         data-v1  DVC " in traced.stdout and "promotion by" in traced.stdout

    train, holdout = split_by_row_key(load_version_frame("data-v1", settings))
    for name, rows in (("train.csv", train), ("holdout.csv", holdout)):
        expected = write_frame(rows, tmp_path / f"expected-{name}").read_bytes()
        assert (restored / name).read_bytes() == expected
    stored = model_registry.stored_reference(version, settings)
    assert (restored / "train.csv").read_bytes() == write_frame(
        stored.train[list(DATA_COLUMNS)], tmp_path / "stored.csv"
    ).read_bytes()
    manifest_text = (restored / "lineage.json").read_text()
    manifest = json.loads(manifest_text)
    assert manifest["prediction"]["encounter_hash"] == digest and encounter not in manifest_text
    assert manifest["restored"]["files"]["train.csv"]["rows"] == len(train)

    unknown = runner.invoke(app, ["lineage", "--encounter-id", "never-seen"])
    assert unknown.exit_code == 1 and "no prediction logged for that encounter id" in unknown.output
    assert "never-seen" not in unknown.output
