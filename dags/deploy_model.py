"""
### deploy_model

Rolls the champion model version out to the stable BentoML endpoint (`MEDOPS_SERVING_PORT`,
default 3000) without a failed request, or back to an earlier version.

* **Runs when** `train_model` promotes a version (Asset `medops/champion`), or manually with the
  form's `model_version`: a rollback, or serving a champion again after `medops serve-stop`.
* **Steps**: `choose_version` (the form, else `@champion`, else the promotion's event) ->
  `build_bento` (the Bento tagged with the version) -> `roll_out` (start it beside the running
  server, smoke-test it against the MLflow model's predictions, switch the stable endpoint to it).
* **On failure** the version served before keeps serving, `@champion` points back to it and an
  alert goes to on-call people; the task fails with the reason.
* **Protocol**: a version whose gate did not pass is refused in `choose_version` unless the form
  names who decided to serve it anyway (`override_by`) and why (`override_reason`); the override,
  the deployment and any rollback are entries in the audit trail (`medops audit show`).
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
        "override_by": Param(
            None,
            type=["null", "string"],
            description="Only to serve a version whose gate did not pass: the name of the person who decided it "
            "(recorded in the audit trail). Blank: such a version is refused.",
        ),
        "override_reason": Param(
            None,
            type=["null", "string"],
            description="Why that version is served anyway (required with override_by).",
        ),
    },
)
def deploy_model():
    @task
    def choose_version() -> str:
        """The version to serve (the form's, else @champion, else the promotion event's), if the protocol allows."""
        from airflow.sdk.exceptions import AirflowFailException

        from medops.core.settings import get_settings
        from medops.orchestration import actor_of
        from serving.rollout import DeployRefused, require_deployable, version_to_deploy

        settings, context = get_settings(), get_current_context()
        params = context["params"]
        version = version_to_deploy(
            settings, requested=params.get("model_version"), triggering_events=context.get("triggering_asset_events")
        )
        try:
            overridden_by = require_deployable(
                version,
                settings,
                override_by=params.get("override_by"),
                override_reason=params.get("override_reason"),
                actor=actor_of(context),
            )
        except DeployRefused as refused:  # a decision, not a glitch: retrying cannot change it
            raise AirflowFailException(str(refused)) from None
        if overridden_by:
            print(f"model version {version}: gate did not pass; served on {overridden_by}'s override")
        return version

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
        from medops.app.run_notes import note_run, rollout_note, summary
        from medops.core.links import mlflow_model_version
        from medops.core.settings import get_settings
        from medops.orchestration import actor_of
        from serving.rollout import DeployFailed, deploy

        # choose_version applied the protocol (and recorded any override) before the build
        settings, context = get_settings(), get_current_context()
        # Not asked for a version: choose_version took @champion's, so that is what the alias named; a
        # promotion since then stays (its own run serves it next) instead of being pointed back here.
        champion_seen = None if context["params"].get("model_version") else version
        try:
            result = deploy(
                version, settings, bento=bento, actor=actor_of(context), gate_checked=False, champion_seen=champion_seen
            )
        except DeployFailed as error:
            note_run("deploy_model", context["run_id"], rollout_note(version, error, settings), settings)
            raise
        summary(
            f"model version {result.version} serving ({result.switch}, {result.seconds:.1f} s; was {result.previous})",
            {"service": result.url, "model version": mlflow_model_version(settings, settings.model_name, version)},
            "monitor_drift watches what the service receives",
        )
        return result.to_dict()

    version = choose_version()
    roll_out(version, build_bento(version))


deploy_model()
