"""
### train_model

Trains, evaluates and registers a diagnosis model, then lets the gate decide about `@champion`.

* **Runs when** a new data version is announced (`medops/data`), when `monitor_drift` saw drift
  (`medops/drift`, at most once per `MEDOPS_RETRAIN_COOLDOWN_HOURS`), or manually with the form.
* **Steps**: `plan` (what to train on; drift inside the cooldown skips the run), `search` (one
  mapped task per model family, on the `train` queue: cross-validated search of logistic
  regression, SVM or gradient boosting), `choose` (the best family), `fit` (an operating
  threshold meeting the sensitivity target, the final fit, hold-out evaluation; files in a work
  folder under `MEDOPS_HOME/training`), `log_run` (one MLflow run: metrics, plots, data version + DVC hash, code
  git sha, this run's id, the exact training and hold-out rows with their scores and the feature
  importance under `reference/`), `register` (a model version with `@challenger` and the model card).
* **Gate**: sensitivity >= 0.95 and ROC AUC >= 0.97 on the hold-out rows (form-configurable) and no
  more than 0.01 ROC AUC below the champion on the same rows. The decision and its reasons are
  tags on the model version.
* **Approval**: with `MEDOPS_REQUIRE_APPROVAL=true`, a drift-triggered promotion waits for a person
  in *Required actions*; otherwise the gate alone decides.
* **Emits** `medops/champion` on promotion, which schedules `deploy_model`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param, dag, get_current_context, task

from medops.orchestration import CHAMPION, DATA, DEFAULT_ARGS, DRIFT

FAMILIES = ["logistic_regression", "svm", "gradient_boosting"]


@dag(
    dag_id="train_model",
    schedule=(DATA | DRIFT),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
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
        "min_sensitivity": Param(
            None,
            type=["null", "number"],
            minimum=0,
            maximum=1,
            description="Gate: blank uses MEDOPS_MIN_SENSITIVITY (0.95).",
        ),
        "min_roc_auc": Param(
            None,
            type=["null", "number"],
            minimum=0,
            maximum=1,
            description="Gate: blank uses MEDOPS_MIN_ROC_AUC (0.97).",
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
    @task
    def plan() -> dict:
        """Decide what to train on and with which gate; skip drift inside the cooldown."""
        from dataclasses import asdict

        from airflow.sdk.exceptions import AirflowSkipException

        from medops.core.settings import get_settings
        from pipelines.retraining import plan_training
        from pipelines.train import GateConfig

        settings, context = get_settings(), get_current_context()
        params = context["params"]
        planned = plan_training(
            settings,
            triggering_events=context.get("triggering_asset_events") or {},
            data_version=params.get("data_version") or None,
        )
        if planned is None:
            raise AirflowSkipException("drift retraining skipped: inside the cooldown")
        gate = GateConfig.from_settings(
            settings, min_sensitivity=params.get("min_sensitivity"), min_roc_auc=params.get("min_roc_auc")
        )
        return planned | {"families": params.get("families") or None, "gate": asdict(gate)}

    @task
    def candidate_families(planned: dict) -> list[str]:
        """The families to search, one mapped task each."""
        return planned["families"] or FAMILIES

    # Training goes to the `train` queue: in the cluster profile only workers serving it take it
    # (LocalExecutor ignores queues); everything else runs on `[operators] default_queue`.
    @task(queue="train")
    def search(planned: dict, family: str) -> dict:
        """Cross-validated search of one family on the planned data version (one of the fan-out)."""
        import os
        import socket

        from medops.core.settings import get_settings
        from pipelines.train import search_family

        searched = search_family(get_settings(), planned["data_version"], family)
        # Which host searched it: the cluster's test reads this line from the task log
        print(f"search ran on host {socket.gethostname()} as {os.environ.get('MEDOPS_WORKER_NAME', 'local executor')}")
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
        """Threshold, fit and evaluate the chosen family; the model and reference rows go to a work folder."""
        import os
        import socket

        from medops.core.settings import get_settings
        from pipelines.train import fit_candidate, training_work_dir

        settings, context = get_settings(), get_current_context()
        result = fit_candidate(
            settings,
            planned["data_version"],
            work_dir=training_work_dir(settings, context["run_id"]),
            chosen=chosen,
        )
        print(f"fit ran on host {socket.gethostname()} as {os.environ.get('MEDOPS_WORKER_NAME', 'local executor')}")
        print(f"{result.family} on {result.data_version}: {result.metrics}")
        return result.to_dict()

    @task
    def log_run(planned: dict, fitted: dict) -> str:
        """Log the fit as one MLflow run (metrics, plots, inputs, model, reference rows); returns its id."""
        from medops.core.settings import get_settings
        from pipelines.train import FitResult, GateConfig
        from pipelines.train import log_run as log_fit

        context = get_current_context()
        return log_fit(
            FitResult.from_dict(fitted),
            get_settings(),
            gate_config=GateConfig(**planned["gate"]),
            trigger=planned["trigger"],
            airflow_run_id=context["run_id"],
        )

    @task
    def register(planned: dict, fitted: dict, mlflow_run_id: str) -> dict:
        """Register the run's model as @challenger and tag the gate's decision and the model card."""
        from medops.core.settings import get_settings
        from pipelines.train import FitResult, GateConfig, discard_work, register_version

        context = get_current_context()
        fit_result = FitResult.from_dict(fitted)
        result = register_version(
            mlflow_run_id,
            fit_result,
            get_settings(),
            gate_config=GateConfig(**planned["gate"]),
            trigger=planned["trigger"],
            airflow_run_id=context["run_id"],
        )
        discard_work(fit_result)
        print(f"model version {result.model_version} ({result.family}): {result.metrics}")
        print(f"gate {'passed' if result.gate.passed else 'failed'}: {'; '.join(result.gate.reasons)}")
        return {
            "model_version": result.model_version,
            "mlflow_run_id": mlflow_run_id,
            "gate_passed": result.gate.passed,
            "trigger": planned["trigger"],
            "reasons": result.gate.reasons,
            "needs_approval": planned["needs_approval"],
        }

    @task.branch
    def decide(result: dict) -> str | list[str] | None:
        """Rejected by the gate: stop. Drift-triggered with approval required: ask a person."""
        if not result["gate_passed"]:
            return None
        return ["await_approval", "promote"] if result["needs_approval"] else "promote"

    await_approval = ApprovalOperator(
        task_id="await_approval",
        subject="Promote model version {{ ti.xcom_pull(task_ids='register')['model_version'] }} to @champion?",
        body=(
            "A drift-triggered retraining passed the gate.\n\n"
            "{{ ti.xcom_pull(task_ids='register')['reasons'] | join('\n\n') }}\n\n"
            "Compare it with the champion in the MLflow UI before approving."
        ),
        response_timeout=timedelta(days=2),
        retries=0,
    )

    @task(outlets=[CHAMPION], trigger_rule="none_failed_min_one_success")
    def promote(result: dict) -> str:
        """Move @champion to the new version (the gate passed and, if asked, a person approved)."""
        from medops.core.settings import get_settings
        from pipelines.train import promote as promote_version

        settings, context = get_settings(), get_current_context()
        approved_by = None
        if result["needs_approval"]:
            approval = context["ti"].xcom_pull(task_ids="await_approval") or {}
            approved_by = str(approval.get("responded_by_user") or approval.get("responded_by") or "approver")
        if not promote_version(result["model_version"], settings, approved_by=approved_by):
            raise RuntimeError(f"model version {result['model_version']} did not pass the gate")
        context["outlet_events"][CHAMPION].extra = {"model_version": result["model_version"]}
        return result["model_version"]

    planned = plan()
    searched = search.partial(planned=planned).expand(family=candidate_families(planned))
    fitted = fit(planned, choose(searched))
    trained = register(planned, fitted, log_run(planned, fitted))
    branch = decide(trained)
    promoted = promote(trained)
    branch >> [await_approval, promoted]
    await_approval >> promoted


train_model()
