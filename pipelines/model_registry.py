"""The MLflow side of medops: where runs go, and the model registry's aliases.

Promotion uses aliases (``@champion``, ``@challenger``), never registry stages. Decisions and
their reasons are tags on the model version, so the registry page tells the whole story.
"""

from __future__ import annotations

import subprocess
from typing import Any

from medops.core.settings import REPO_ROOT, Settings

CHAMPION = "champion"
CHALLENGER = "challenger"
EXPERIMENT = "medops-training"


def configure_mlflow(settings: Settings) -> None:
    """Point the MLflow client at the medops store (SQLite + local artifacts by default)."""
    import mlflow

    if settings.tracking_uri.startswith("sqlite:///"):
        settings.mlflow_dir.mkdir(parents=True, exist_ok=True)
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)


def ensure_experiment(settings: Settings, name: str = EXPERIMENT) -> str:
    """The experiment's id, created with its artifacts under ``MEDOPS_HOME`` on first use."""
    import mlflow

    configure_mlflow(settings)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # With the embedded SQLite store, artifacts live beside it; a tracking server decides for itself.
    location = (settings.artifact_root / name).as_uri() if settings.tracking_uri.startswith("sqlite") else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it between our two calls
        return mlflow.get_experiment_by_name(name).experiment_id


def client(settings: Settings):
    from mlflow import MlflowClient

    configure_mlflow(settings)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def alias_version(alias: str, settings: Settings) -> str | None:
    """The model version an alias points at, or None when it is not set (or no model exists)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client(settings).get_model_version_by_alias(settings.model_name, alias).version)
    except MlflowException:
        return None


def champion_version(settings: Settings) -> str | None:
    return alias_version(CHAMPION, settings)


def set_champion(version: str, settings: Settings) -> None:
    """Point ``@champion`` at a version (promotion, or rollback to the previous champion)."""
    mlflow_client = client(settings)
    mlflow_client.set_registered_model_alias(settings.model_name, CHAMPION, str(version))


def version_tags(version: str, settings: Settings) -> dict[str, str]:
    return dict(client(settings).get_model_version(settings.model_name, str(version)).tags)


def tag_version(version: str, tags: dict[str, Any], settings: Settings) -> None:
    mlflow_client = client(settings)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(settings.model_name, str(version), key, str(value))


def model_uri(version: str, settings: Settings) -> str:
    return f"models:/{settings.model_name}/{version}"


def load_model(version: str, settings: Settings):
    """The fitted scikit-learn estimator of a version (its operating threshold inside)."""
    import mlflow.sklearn

    configure_mlflow(settings)
    return mlflow.sklearn.load_model(model_uri(version, settings))


def code_version() -> str:
    """The git sha of the code that trains, with ``-dirty`` when the checkout has local changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha
