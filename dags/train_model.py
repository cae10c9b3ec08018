"""
### train_model

Trains, evaluates and registers a diagnosis model, then lets the gate decide about `@champion`.

* **Runs when** a new data version is announced (`medops/data`), when `monitor_drift` saw drift
  (`medops/drift`, at most once per `MEDOPS_RETRAIN_COOLDOWN_HOURS`), or manually with the form.
* **Steps**: `plan` (what to train on, the gate thresholds, what needs a person's approval; drift
  inside the cooldown skips the run), `search` (one mapped task per model family: cross-validated
  search on the training side of the row-hash split), `choose` (the best family), `fit` (hold-out
  of the modification protocol's share, an operating threshold meeting the sensitivity target, then
  one MLflow run with the figures, the data version and the exact training and hold-out rows under
  `reference/`), `register` (the run's audit entry, a model version with `@challenger`, the gate's
  decision as `gate/decision.json` and tags, the model card).
* **Hosts**: `search` and `fit` run on the `train` queue; a worker without a registry of its own
  (`MEDOPS_REGISTRY_URL`, the cluster's) reads the data version over git and the DVC remote, and
  hands its model on through MLflow only; their logs name the worker and its `MEDOPS_HOME`.
* **Gate** (`pipelines/modification_protocol.yaml`): the lower ends of 95 % intervals of
  sensitivity, specificity and ROC AUC reach the protocol's floors, overall and at every site with
  enough hold-out rows, and the candidate is non-inferior to the champion on the same stored rows.
  The form may tighten the floors; looser ones need a person's approval.
* **Approval**: what the protocol reserves for a person, and drift-triggered promotions with
  `MEDOPS_REQUIRE_APPROVAL=true`, wait in *Required actions*; the approver's Airflow user name
  goes to the audit trail, and without it nothing is promoted.
* **Emits** `medops/champion` on promotion, which schedules `deploy_model`; and `medops/data` when
  drift retraining versioned feedback labels (that event names this run in `trained_by`, so the
  run it schedules skips instead of training on the same data again).
* **Run note**: refused (the gate's reasons), waiting for approval, or promoted, with links.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param, dag, get_current_context, task

from medops.orchestration import CHAMPION, DATA, DEFAULT_ARGS, DRIFT, NEW_DATA

FAMILIES = ["logistic_regression", "svm", "gradient_boosting"]


@dag(
    dag_id="train_model",
    schedule=(DATA | DRIFT),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    # Two data versions landing at once train side by side (the cluster's workers take both); the
    # registry numbers versions itself and promotions take turns (pipelines.train.promote).
    max_active_runs=2,
    default_args=DEFAULT_ARGS,
    tags=["medops", "training"],
    doc_md=__doc__,
    params={
        "families": Param(
            FAMILIES,
            type="array",
            items={"type": "string", "enum": FAMILIES},
            description="Model families the search compares.",
        ),
        "sensitivity_lower": Param(
            None,
            type=["null", "number"],
            minimum=0,
            maximum=1,
            description="Gate: floor on the lower 95 % bound of sensitivity. Blank: the modification protocol's "
            "floor. Lower than the protocol's waits for a person's approval.",
        ),
        "roc_auc_lower": Param(
            None,
            type=["null", "number"],
            minimum=0,
            maximum=1,
            description="Gate: floor on the lower 95 % bound of ROC AUC. Blank: the protocol's floor. "
            "Lower than the protocol's waits for a person's approval.",
        ),
        "non_inferiority_margin": Param(
            None,
            type=["null", "number"],
            minimum=0,
            maximum=1,
            description="Gate: how far the lower bound of AUC(candidate) - AUC(champion) may fall below zero. "
            "Blank: the protocol's margin. Larger waits for a person's approval.",
        ),
        "data_version": Param(
            None,
            type=["null", "string"],
            pattern=r"^data-v[0-9]+$",
            description="Data version (data-vN) to train on. Blank: the latest.",
        ),
    },
)
def train_model():
    @task(outlets=[NEW_DATA])
    def plan() -> dict:
        """Decide what to train on, with which gate thresholds, and what needs a person's approval."""
        from airflow.sdk.exceptions import AirflowSkipException

        from medops.core.settings import get_settings
        from medops.orchestration import actor_of
        from pipelines.retraining import plan_training
        from pipelines.train import FORM_THRESHOLDS, plan_gate

        settings, context = get_settings(), get_current_context()
        params = context["params"]
        planned = plan_training(
            settings,
            triggering_events=context.get("triggering_asset_events") or {},
            data_version=params.get("data_version") or None,
        )
        if planned is None:
            raise AirflowSkipException("nothing to train: drift inside the cooldown, or data already being trained on")
        if planned.get("new_data_version"):  # the feedback labels retraining versioned, as an Asset event
            extra = {"data_version": planned["new_data_version"], "origin": "feedback", "trained_by": context["run_id"]}
            context["outlet_events"][NEW_DATA].add(DATA, extra=extra)
        families = params.get("families") or None
        form = {name: params.get(name) for name in FORM_THRESHOLDS}
        gate = plan_gate(settings, families=families, form=form, trigger=planned["trigger"])
        for reason in gate["approval_reasons"]:
            print(f"needs a person's approval: {reason}")
        return planned | gate | {"families": families, "actor": actor_of(context)}

    @task
    def candidate_families(planned: dict) -> list[str]:
        """The families to search, one mapped task each."""
        return planned["families"] or FAMILIES

    # Training goes to the `train` queue: in the cluster profile only workers serving it take it
    # (LocalExecutor ignores queues); everything else runs on `[operators] default_queue`.
    @task(queue="train")
    def search(planned: dict, family: str) -> dict:
        """Cross-validated search of one family on the planned data version's training rows (one of the fan-out)."""
        from medops.core.settings import get_settings
        from pipelines.train import search_family

        settings = get_settings()
        searched = search_family(settings, planned["data_version"], family)
        print(_where("search", settings))  # the cluster's test reads this line from the task log
        print(f"{family} on {searched['data_version']}: CV ROC AUC {searched['cv_roc_auc']:.4f} {searched['params']}")
        return searched

    @task
    def choose(searched: list[dict]) -> dict:
        """The reduce: the best family of the fan-out (the simplest on a tie)."""
        from pipelines.train import choose_best

        chosen = choose_best(list(searched))
        print(f"chosen: {chosen['family']} ({chosen['cv_scores']})")
        return chosen

    @task(queue="train")
    def fit(planned: dict, chosen: dict) -> dict:
        """Threshold, fit and evaluate the chosen family on the row-hash split, and log it as one MLflow
        run; returns the figures and the run's id. Its work folder lives only as long as the task."""
        import shutil

        from medops.core.settings import get_settings
        from pipelines.model_registry import run_url
        from pipelines.train import fit_candidate, log_run, training_work_dir

        settings, context = get_settings(), get_current_context()
        work_dir = training_work_dir(settings, context["run_id"])
        try:
            result = fit_candidate(
                settings, planned["data_version"], planned["families"], work_dir=work_dir, chosen=chosen
            )
            print(_where("fit", settings))  # the cluster's test reads this line from the task log
            print(f"{result.family} on {result.data_version}: {result.metrics}")
            holdout = result.holdout
            print(
                f"hold-out: {holdout['rows']} rows, {holdout['malignant']} malignant, fingerprint {holdout['sha256']}"
            )
            # the audit entry is register's (the scheduler's side keeps the audit trail)
            mlflow_run_id = log_run(result, settings, audit=False, **_run_facts(planned, context["run_id"]))
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        print(f"MLflow run: {run_url(mlflow_run_id, settings)}")
        return result.to_dict() | {"mlflow_run_id": mlflow_run_id}

    @task
    def register(planned: dict, fitted: dict) -> dict:
        """Audit the run, register its model as @challenger, gate it on the stored hold-out, publish the
        model card: from the fit's XCom and MLflow only, nothing of the worker's disk."""
        from medops.app.run_notes import summary
        from medops.core.links import mlflow_model_version
        from medops.core.settings import get_settings
        from pipelines.model_registry import run_url
        from pipelines.train import FitResult, record_training_run, register_version

        settings, context = get_settings(), get_current_context()
        fit_result, mlflow_run_id = FitResult.from_dict(fitted), fitted["mlflow_run_id"]
        steps = _run_facts(planned, context["run_id"])
        record_training_run(fit_result, mlflow_run_id, settings, **steps)
        result = register_version(
            mlflow_run_id, fit_result, settings, approval_reasons=planned["approval_reasons"], **steps
        )
        url = run_url(mlflow_run_id, settings)
        print(f"model version {result.model_version} ({result.family}): {result.metrics}")
        print(f"MLflow run (figures, gate/decision.json, model_card/model_card.html): {url}")
        print(f"gate {'passed' if result.gate.passed else 'failed'}:\n" + "\n".join(result.gate.reasons))
        outcome = "passed" if result.gate.passed else "REFUSED: @champion unchanged"
        summary(
            f"model version {result.model_version} ({result.family}) registered as @challenger; gate {outcome}",
            {"MLflow run": url, "version": mlflow_model_version(settings, settings.model_name, result.model_version)},
            ("a person approves in Required actions, then promote" if planned["needs_approval"] else "promote")
            if result.gate.passed
            else "retrain on more data or review the gate's reasons above",
        )
        return {
            "model_version": result.model_version,
            "mlflow_run_id": mlflow_run_id,
            "run_url": url,
            "gate_passed": result.gate.passed,
            "trigger": planned["trigger"],
            "reasons": result.gate.reasons,
            "approval_reasons": planned["approval_reasons"],
            "needs_approval": planned["needs_approval"],
        }

    @task.branch
    def decide(result: dict) -> str | list[str] | None:
        """Refused by the gate: stop. A change the protocol reserves for a person: ask one."""
        from medops.app.run_notes import note_run, training_note
        from medops.core.settings import get_settings

        settings = get_settings()
        note_run("train_model", get_current_context()["run_id"], training_note(result, settings), settings)
        if not result["gate_passed"]:
            return None
        return ["await_approval", "promote"] if result["needs_approval"] else "promote"

    await_approval = ApprovalOperator(
        task_id="await_approval",
        subject="Promote model version {{ ti.xcom_pull(task_ids='register')['model_version'] }} to @champion?",
        body=(
            "Promoting this version needs a named person's approval:\n\n"
            "{{ ti.xcom_pull(task_ids='register')['approval_reasons'] | join('\n\n') }}\n\n"
            "The gate passed:\n\n"
            "{{ ti.xcom_pull(task_ids='register')['reasons'] | join('\n\n') }}\n\n"
            "Figures, the gate's decision and the model card: {{ ti.xcom_pull(task_ids='register')['run_url'] }}"
        ),
        response_timeout=timedelta(days=2),
        retries=0,
    )

    @task(outlets=[CHAMPION], trigger_rule="none_failed_min_one_success")
    def promote(result: dict) -> str:
        """Move @champion to the new version (the gate passed and, if asked, a named person approved)."""
        from medops.app.run_notes import note_run, summary, training_note
        from medops.core.settings import get_settings
        from medops.orchestration import approver_of
        from pipelines.train import promote as promote_version

        settings, context = get_settings(), get_current_context()
        approved_by = reason = None
        if result["needs_approval"]:
            response = context["ti"].xcom_pull(task_ids="await_approval")
            approved_by = approver_of(response)
            reasons = "; ".join(result["approval_reasons"])
            reason = f"approved in Airflow's Required actions at {response.get('responded_at')}: {reasons}"
        if not promote_version(result["model_version"], settings, approved_by=approved_by, approval_reason=reason):
            from airflow.sdk.exceptions import AirflowSkipException

            # only a concurrent training's promotion gets here: judged again against it, this one lost
            raise AirflowSkipException(
                f"model version {result['model_version']} does not pass the gate against the champion "
                "another training promoted meanwhile (its tags and the audit trail say why)"
            )
        context["outlet_events"][CHAMPION].extra = {"model_version": result["model_version"]}
        note = training_note(result | {"promoted": True, "approved_by": approved_by}, settings)
        note_run("train_model", context["run_id"], note, settings)
        summary(f"@champion → model version {result['model_version']}", {"MLflow run": result["run_url"]},
                "deploy_model rolls it out (Asset medops/champion)")  # fmt: skip
        return result["model_version"]

    planned = plan()
    searched = search.partial(planned=planned).expand(family=candidate_families(planned))
    trained = register(planned, fit(planned, choose(searched)))
    branch = decide(trained)
    promoted = promote(trained)
    branch >> [await_approval, promoted]
    await_approval >> promoted


def _run_facts(planned: dict, airflow_run_id: str) -> dict:
    """What fit and register record about the training: its thresholds, trigger, actor and Airflow run."""
    return {key: planned[key] for key in ("thresholds", "trigger", "actor")} | {"airflow_run_id": airflow_run_id}


def _where(step: str, settings) -> str:
    """Which host ran a training step, with its MEDOPS_HOME, where it read the data registry from and
    the network namespace it ran in (the cluster's train workers: one of their own)."""
    import os
    import socket

    worker = os.environ.get("MEDOPS_WORKER_NAME", "local executor")
    registry = settings.registry_url or settings.registry_dir
    network = os.readlink("/proc/self/ns/net") if os.path.exists("/proc/self/ns/net") else "unknown"
    return (
        f"{step} ran on host {socket.gethostname()} as {worker} with MEDOPS_HOME {settings.home}, registry {registry}"
        f" in network namespace {network}"
    )


train_model()
