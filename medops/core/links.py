"""Links people click between the UIs, built in one place so that run notes, MLflow tags, alerts and
the command line point at the same pages. Only the standard library: DAG tasks import this."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from medops.core.settings import Settings


def airflow_url(settings: Settings) -> str:
    return f"http://{settings.host}:{settings.airflow_port}"


def airflow_run(settings: Settings, dag_id: str, run_id: str) -> str:
    """The run's page in the Airflow 3 UI (grid, notes, task logs)."""
    return f"{airflow_url(settings)}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def mlflow_run(settings: Settings, experiment_id: str, run_id: str) -> str:
    return f"{settings.mlflow_url}/#/experiments/{quote(str(experiment_id), safe='')}/runs/{quote(run_id, safe='')}"


def mlflow_model_version(settings: Settings, model_name: str, version: str | int) -> str:
    return f"{settings.mlflow_url}/#/models/{quote(model_name, safe='')}/versions/{quote(str(version), safe='')}"


def evidently_report(settings: Settings, project_id: str, snapshot_id: str) -> str:
    """A report (snapshot) of a project in the Evidently UI: what an on-call alert links to."""
    project, snapshot = quote(project_id, safe=""), quote(snapshot_id, safe="")
    return f"http://{settings.host}:{settings.evidently_port}/projects/{project}/reports/{snapshot}"
