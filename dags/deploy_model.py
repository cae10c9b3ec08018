"""
### deploy_model

Rolls the champion model version out to the stable BentoML endpoint (`MEDOPS_SERVING_PORT`,
default 3000) without a failed request, or back to an earlier version.

* **Runs when** `train_model` promotes a version (Asset `medops/champion`), or manually with the
  form's `model_version`: a rollback, or serving a champion again after `medops serve-stop`.
* **Steps**: `choose_version` (the form, else the promotion's event, else `@champion`) ->
  `build_bento` (import `models:/<name>/<version>` into BentoML, build the Bento tagged with the
  version) -> `roll_out` (start it beside the running server, smoke-test it: readiness and
  predictions on the version's evaluation rows equal to the MLflow model's; then switch the
  stable endpoint to it, smoke-test the endpoint, stop the candidate, point `@champion` at it).
* **On failure** the version served before keeps serving, `@champion` points back to it and an
  alert goes to on-call people (webhook / e-mail); the task fails with the reason.
* Same functions as `medops deploy --version N` and `medops rollback` (`serving/rollout.py`).
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task

from medops.orchestration import CHAMPION, DEFAULT_ARGS


@dag(
    dag_id="deploy_model",
    schedule=CHAMPION,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["medops", "serving"],
    doc_md=__doc__,
    params={
        "model_version": Param(
            None,
            type=["null", "string"],
            pattern=r"^[0-9]+$",
            description="Registry version to serve (a rollback). Blank: the promoted @champion.",
        ),
    },
)
def deploy_model():
    @task
    def choose_version() -> str:
        """The version to serve: the form's, else the promotion event's, else the current @champion."""
        from medops.core.settings import get_settings
        from serving.rollout import version_to_deploy

        context = get_current_context()
        return version_to_deploy(
            get_settings(),
            requested=context["params"].get("model_version"),
            triggering_events=context.get("triggering_asset_events"),
        )

    @task
    def build_bento(version: str) -> str:
        """Import the version from the MLflow registry into BentoML and build its Bento (tag = version)."""
        from medops.core.settings import get_settings
        from serving.rollout import prepare_bento

        prepared = prepare_bento(version, get_settings())
        print(f"Bento {prepared.bento} with model {prepared.model}")
        return prepared.bento

    @task(retries=1)
    def roll_out(version: str, bento: str) -> dict:
        """Start the Bento beside the running one, smoke-test, switch the stable endpoint, stop the old."""
        from medops.app.run_notes import note_run, rollout_note
        from medops.core.settings import get_settings
        from serving.rollout import DeployFailed, deploy

        settings = get_settings()
        try:
            result = deploy(version, settings, bento=bento)
        except DeployFailed as error:
            note_run("deploy_model", get_current_context()["run_id"], rollout_note(version, error, settings), settings)
            raise
        print(f"model version {result.version} serving on {result.url} ({result.switch}; was {result.previous})")
        return result.to_dict()

    version = choose_version()
    roll_out(version, build_bento(version))


deploy_model()
