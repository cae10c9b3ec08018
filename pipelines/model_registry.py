"""The MLflow side of medops: where runs go, the model registry's aliases, and what a run stored.

Promotion uses aliases (``@champion``, ``@challenger``), never registry stages; decisions and their
reasons are tags on the model version. Every training run also stores its *reference* under
``reference/``: the exact training and hold-out rows, each with the model's
``probability_malignant``, and the feature importance. Whatever runs downstream of training reads
them with :func:`stored_reference` instead of splitting the data again, so a setting changed since
cannot make it compare against other rows.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medops.core.settings import REPO_ROOT, Settings
from pipelines.schema import DATA_COLUMNS, FEATURES, LABEL, SITE

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
EXPERIMENT = "medops-training"
# The MLflow 3 UI opens an experiment in its GenAI view (traces) unless this tag names its kind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def configure_mlflow(settings: Settings) -> None:
    """Point the MLflow client at the medops store (SQLite + local artifacts by default); medops' own
    server (the cluster profile's) is behind basic auth, and MLflow's client reads its login from the
    environment only."""
    import os

    import mlflow

    if settings.tracking_uri.startswith("sqlite:///"):
        settings.mlflow_dir.mkdir(parents=True, exist_ok=True)
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
    elif settings.tracking_uri == settings.mlflow_url:
        os.environ.update(settings.mlflow_credentials())
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)


def ensure_experiment(settings: Settings, name: str = EXPERIMENT) -> str:
    """The experiment's id, created with its artifacts under ``MEDOPS_HOME`` on first use."""
    import mlflow

    configure_mlflow(settings)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:  # stores made before the tag
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return experiment.experiment_id
    # With the embedded SQLite store, artifacts live beside it; a tracking server decides for itself.
    location = (settings.artifact_root / name).as_uri() if settings.tracking_uri.startswith("sqlite") else None
    try:
        return mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
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


def champion_lock(settings: Settings):
    """Held while ``@champion`` is read, judged against and moved: two trainings promote one at a time.

    A file under ``MEDOPS_HOME``: every process that promotes shares it (the Celery workers of the
    cluster profile run on this host); workers on other hosts would need a lock they all reach.
    """
    from medops.core.files import file_lock

    return file_lock(settings.home / "state" / ".champion.lock", timeout=900)


def set_champion(version: str, settings: Settings) -> None:
    """Point ``@champion`` at a version (promotion, or rollback to the previous champion)."""
    client(settings).set_registered_model_alias(settings.model_name, CHAMPION, str(version))


def version_tags(version: str, settings: Settings) -> dict[str, str]:
    return dict(client(settings).get_model_version(settings.model_name, str(version)).tags)


def tag_version(version: str, tags: dict[str, Any], settings: Settings) -> None:
    mlflow_client = client(settings)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(settings.model_name, str(version), key, str(value))


@contextlib.contextmanager
def quiet_model_io() -> Iterator[None]:
    """Saving or loading a model without the noise that buries a task's log.

    Importing ``skops.io`` lists scipy's ufuncs by looking each one up in every loaded module; in
    an Airflow task those include Airflow's deprecated-name shims (``airflow.utils.timezone``...),
    whose every attribute warns (``DeprecatedImportWarning``, a FutureWarning): 1,160 lines per
    task log. So skops is first imported here, under the filter (never import it outside this
    context), and its saves and loads, which may look names up the same way, run under it too.
    (stderr is left alone: the command line prints JSON on stdout, and a redirected library
    warning would break it.)
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"skops\.io")
        import skops.io  # noqa: F401  (the import is the noisy part)

        yield


def download_model(uri: str, directory: Path, settings: Settings) -> Path:
    """Copy the MLflow model at ``uri`` (``models:/...``) into ``directory``; returns its folder."""
    import mlflow.artifacts

    configure_mlflow(settings)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(directory)))


def register_trusted(uri: str, settings: Settings) -> str:
    """Register the logged model at ``uri`` as a new version, if medops may ever load it.

    Refuses (:class:`pipelines.model_trust.UntrustedModel`) anything but a skops model of the
    trusted types, and records the SHA-256 of the very file it checked as the version's
    ``model_sha256`` tag, in the same call that creates the version, so that no version exists
    without it. Every later load compares the artifact with that digest.
    """
    import tempfile

    import mlflow

    from pipelines import model_trust

    with tempfile.TemporaryDirectory(prefix="medops-register-") as tmp, quiet_model_io():
        digest = model_trust.registrable_digest(download_model(uri, Path(tmp), settings), f"the model at {uri}")
    # MLflow prints "Created version ..." to stderr, which an Airflow task logs at ERROR level.
    printed = io.StringIO()
    try:
        with quiet_model_io(), contextlib.redirect_stderr(printed):
            return str(mlflow.register_model(uri, settings.model_name, tags={model_trust.DIGEST_KEY: digest}).version)
    finally:
        for line in printed.getvalue().splitlines():
            log.info("%s", line)


def load_model(version: str, settings: Settings):
    """The fitted scikit-learn estimator of a version (its operating threshold inside).

    Loaded as :func:`pipelines.model_trust.load_trusted` allows only: skops, the trusted types,
    and the bytes whose digest registration recorded. A changed artifact is refused and raises
    an alert (a person must find out who wrote to the model store).
    """
    import tempfile

    from pipelines import model_trust

    what = f"model version {version} of {settings.model_name}"
    expected = version_tags(version, settings).get(model_trust.DIGEST_KEY)
    with tempfile.TemporaryDirectory(prefix="medops-model-") as tmp:
        local = download_model(f"models:/{settings.model_name}/{version}", Path(tmp), settings)
        try:
            with quiet_model_io():
                return model_trust.load_trusted(local, expected, what)
        except model_trust.ModelTampered as error:
            from medops.core.alerts import send_alert

            title = f"medops refused tampered {what}"
            send_alert(title, "failure", [], None, None, settings, severity="critical", details=str(error))
            raise


def run_url(run_id: str, settings: Settings, experiment_id: str | None = None) -> str:
    """Where a run's page is in the MLflow UI that ``medops up`` starts (the task logs print it)."""
    experiment_id = experiment_id or client(settings).get_run(run_id).info.experiment_id
    return f"{settings.mlflow_url}/#/experiments/{experiment_id}/runs/{run_id}"


def code_version() -> str:
    """The git sha of the code that trains, with ``-dirty`` when the checkout has local changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


# The stored reference of a training run -------------------------------------------------------------
REFERENCE = "reference"
"""Artifact folder of a training run holding the reference files below."""
REFERENCE_TRAIN = "train.csv"
REFERENCE_HOLDOUT = "holdout.csv"
REFERENCE_IMPORTANCE = "importance.json"
PROBABILITY = "probability_malignant"


class MissingReference(LookupError):
    """A model version whose training run stored no reference rows (registered before runs logged them)."""


@dataclass(frozen=True)
class StoredReference:
    """What a model version's training run stored: its rows with the model's scores, and importances.

    ``train`` and ``holdout`` have the 30 features, ``diagnosis``, ``site_id`` and the model's
    ``probability_malignant``, row for row as training used them. ``importance`` maps each feature
    to its share (sums to 1), computed as ``importance_method`` says.
    """

    model_version: str
    run_id: str
    data_version: str | None
    train: pd.DataFrame
    holdout: pd.DataFrame
    importance: dict[str, float]
    importance_method: str


def write_reference(model: Any, train: pd.DataFrame, holdout: pd.DataFrame, directory: Path, *, seed: int) -> Path:
    """Write a model's reference files into ``directory`` (to be logged as the run's ``reference/``).

    Rows keep full float precision (read back bit for bit by :func:`read_reference`); the scores
    are the model's own, and the importance is :func:`pipelines.metrics.feature_importance`.
    """
    from pipelines.metrics import feature_importance, probability_malignant

    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in ((REFERENCE_TRAIN, train), (REFERENCE_HOLDOUT, holdout)):
        scored = rows[list(DATA_COLUMNS)].assign(**{PROBABILITY: probability_malignant(model, rows)})
        scored.to_csv(directory / name, index=False, lineterminator="\n")
    importance = feature_importance(model, train, holdout, seed=seed)
    document = {"method": importance.method, "importance": importance.importance}
    (directory / REFERENCE_IMPORTANCE).write_text(json.dumps(document, indent=1) + "\n")
    return directory


def read_reference(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float], str]:
    """(training rows, hold-out rows, importance, importance method) from reference files on disk."""
    import pandas as pd

    dtypes = {name: "float64" for name in (*FEATURES, PROBABILITY)} | {LABEL: "string", SITE: "string"}
    columns = [*DATA_COLUMNS, PROBABILITY]
    frames = [
        pd.read_csv(directory / name, dtype=dtypes, usecols=columns, float_precision="round_trip")[columns]
        for name in (REFERENCE_TRAIN, REFERENCE_HOLDOUT)
    ]
    document = json.loads((directory / REFERENCE_IMPORTANCE).read_text())
    importance = {name: float(document["importance"][name]) for name in FEATURES}
    return frames[0], frames[1], importance, str(document["method"])


def stored_reference(version: str, settings: Settings) -> StoredReference:
    """The reference rows, scores and importances the training run of a model version stored.

    Raises :class:`MissingReference` for a version whose run stored none: recomputing them from
    today's settings could silently give other rows, which is what storing them prevents.
    """
    import tempfile

    mlflow_client = client(settings)
    model_version = mlflow_client.get_model_version(settings.model_name, str(version))
    run_id = model_version.run_id
    wanted = (REFERENCE_TRAIN, REFERENCE_HOLDOUT, REFERENCE_IMPORTANCE)
    stored = {Path(item.path).name for item in mlflow_client.list_artifacts(run_id, REFERENCE)} if run_id else set()
    missing = [f"{REFERENCE}/{name}" for name in wanted if name not in stored]
    if missing:
        raise MissingReference(
            f"model version {version} of {settings.model_name} has no stored reference "
            f"(missing {', '.join(missing)} in {'run ' + run_id if run_id else 'a training run'}): it was "
            "registered before training stored its rows; retrain it (medops train) to get a version that has them"
        )
    with tempfile.TemporaryDirectory(prefix="medops-reference-") as tmp:
        local = Path(mlflow_client.download_artifacts(run_id, REFERENCE, tmp))
        train, holdout, importance, method = read_reference(local)
    data_version = model_version.tags.get("data_version") or mlflow_client.get_run(run_id).data.tags.get("data_version")
    return StoredReference(str(version), run_id, data_version, train, holdout, importance, method)
