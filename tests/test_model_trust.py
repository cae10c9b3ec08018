"""Trusted models only: skops with medops' own type list, pickle refused, and the artifact's SHA-256
recorded at registration and checked before every load (MLflow's copy and the BentoML store's)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_fixtures import (
    bentoml_store,
    fit_unservable_model,
    register_tiny_model,
    serving_home,
    shared_registry,
)

from medops.core.settings import Settings
from pipelines import model_registry, model_trust
from pipelines.model_trust import ModelTampered, UntrustedModel


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    tracking_uri, _ = shared_registry()
    with serving_home(tmp_path_factory.mktemp("trust"), MEDOPS_MLFLOW_TRACKING_URI=tracking_uri) as settings:
        yield settings


def mlflow_copy(version: str, settings: Settings) -> Path:
    """The skops file of a version in MLflow's artifact store (a local directory here)."""
    from urllib.parse import urlparse

    client = model_registry.client(settings)
    source = client.get_model_version(settings.model_name, version).source  # models:/<logged model id>
    model_id = source.removeprefix("models:/")
    location = Path(urlparse(client.get_logged_model(model_id).artifact_location).path)
    return location / "model.skops"


def flip_a_byte(path: Path) -> str:
    """Change one byte in the middle of ``path``; returns the file's new SHA-256."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return hashlib.sha256(data).hexdigest()


def test_the_trusted_list_covers_every_model_family_and_nothing_else():
    from serving_fixtures import breast_cancer_frame

    from pipelines.train import candidate_estimators, fit_final

    frame = breast_cancer_frame()
    for family, (estimator, _) in candidate_estimators(seed=0).items():
        model_trust.check_types(fit_final(estimator, 0.3, frame), family)  # raises if a type is missing
    with pytest.raises(UntrustedModel, match="ClipToPlausibleRanges"):
        model_trust.check_types(fit_unservable_model())


def test_registration_records_the_digest_and_refuses_foreign_types(home: Settings, tmp_path: Path):
    import mlflow

    version = register_tiny_model(home, alias=None)
    recorded = model_registry.version_tags(version, home)[model_trust.DIGEST_KEY]
    assert recorded == hashlib.sha256(mlflow_copy(version, home).read_bytes()).hexdigest()

    mlflow_client = model_registry.client(home)
    before = len(mlflow_client.search_model_versions(f"name = '{home.model_name}'"))
    with mlflow.start_run(experiment_id=model_registry.ensure_experiment(home, "serving-tests")):
        # its MLmodel file declares the foreign type trusted: medops reads its own list, not that one
        info = mlflow.sklearn.log_model(
            fit_unservable_model(),
            name="model",
            pip_requirements=["scikit-learn"],
            skops_trusted_types=["serving_fixtures.ClipToPlausibleRanges"],
        )
    with pytest.raises(UntrustedModel, match="ClipToPlausibleRanges.*not registered"):
        model_registry.register_trusted(f"models:/{info.model_id}", home)
    assert len(mlflow_client.search_model_versions(f"name = '{home.model_name}'")) == before
    # and were it registered past medops with a digest, loading still trusts medops' list only
    local = model_registry.download_model(f"models:/{info.model_id}", tmp_path, home)
    digest = hashlib.sha256((local / "model.skops").read_bytes()).hexdigest()
    with pytest.raises(UntrustedModel, match="does not trust"):
        model_trust.load_trusted(local, digest, "a model declaring its own types trusted")


def test_pickled_models_are_refused_by_the_registry_and_the_bento_import(home: Settings):
    import bentoml

    from serving.bento_build import import_model

    pickled = register_tiny_model(home, alias=None, serialization_format="cloudpickle")
    with pytest.raises(UntrustedModel, match=f"model version {pickled} .* stored as cloudpickle"):
        model_registry.load_model(pickled, home)
    with bentoml_store(home):
        with pytest.raises(UntrustedModel, match="cloudpickle"):
            import_model(pickled, home)
        with pytest.raises(bentoml.exceptions.NotFound):
            bentoml.models.get(f"{home.model_name}:{pickled}")  # nothing left for a worker to load


def test_a_tampered_mlflow_artifact_is_refused_with_an_alert(home: Settings, monkeypatch: pytest.MonkeyPatch):
    import bentoml

    from medops.core import alerts
    from serving.bento_build import import_model

    sent: list[dict] = []
    monkeypatch.setattr(alerts, "send_alert", lambda title, *args, **kwargs: sent.append({"title": title, **kwargs}))
    version = register_tiny_model(home, alias=None)
    model_registry.load_model(version, home)  # loads while untouched
    expected = model_registry.version_tags(version, home)[model_trust.DIGEST_KEY]
    actual = flip_a_byte(mlflow_copy(version, home))

    with pytest.raises(ModelTampered) as refused:
        model_registry.load_model(version, home)
    message = str(refused.value)
    assert f"model version {version}" in message and expected in message and actual in message
    assert len(sent) == 1 and f"version {version}" in sent[0]["title"] and sent[0]["severity"] == "critical"
    assert actual in sent[0]["details"]
    with bentoml_store(home):
        with pytest.raises(ModelTampered, match=actual):
            import_model(version, home)
        with pytest.raises(bentoml.exceptions.NotFound):
            bentoml.models.get(f"{home.model_name}:{version}")


def test_a_tampered_bentoml_store_copy_is_refused_by_the_serving_worker(home: Settings):
    import bentoml

    from serving.bento_build import import_model
    from serving.scoring import MLFLOW_MODEL_DIR, model_from_store

    version = register_tiny_model(home, alias=None)
    with bentoml_store(home):
        import_model(version, home)
        assert model_from_store(home.model_name, version).version == version  # serves while untouched
        stored = bentoml.models.get(f"{home.model_name}:{version}")
        expected = stored.info.metadata[model_trust.DIGEST_KEY]
        actual = flip_a_byte(Path(stored.path_of(MLFLOW_MODEL_DIR)) / "model.skops")
        with pytest.raises(ModelTampered) as refused:
            model_from_store(home.model_name, version)  # what a worker does at start and at a swap
    message = str(refused.value)
    assert f"model version {version}" in message and expected in message and actual in message


def test_a_model_without_a_recorded_digest_is_not_loaded(tmp_path: Path):
    import mlflow.sklearn
    from serving_fixtures import fit_tiny_model

    mlflow.sklearn.save_model(fit_tiny_model(), tmp_path / "model", serialization_format="skops")
    with pytest.raises(UntrustedModel, match="no recorded artifact digest"):
        model_trust.load_trusted(tmp_path / "model", None, "model version 7")
    digest = hashlib.sha256((tmp_path / "model" / "model.skops").read_bytes()).hexdigest()
    assert model_trust.load_trusted(tmp_path / "model", digest, "model version 7").classes_.tolist()


def test_no_process_medops_starts_may_unpickle(medops_home: Settings, monkeypatch: pytest.MonkeyPatch):
    from medops.core.processes import PICKLE_SWITCH, child_env

    monkeypatch.setenv(PICKLE_SWITCH, "true")
    assert child_env(medops_home)[PICKLE_SWITCH] == "false"
    assert child_env(medops_home, {PICKLE_SWITCH: "true"})[PICKLE_SWITCH] == "false"

    from typer.testing import CliRunner

    from medops.app.cli import app

    umask = os.umask(0o022)
    try:
        assert CliRunner().invoke(app, ["keys", "list"]).exit_code == 0
    finally:
        os.umask(umask)
    assert os.environ[PICKLE_SWITCH] == "false"  # the command line's own process too
