"""A tiny registered model for serving tests, standing in for the real training in ``pipelines``.

It follows the model contract the lead's training will honour: an ``mlflow.sklearn`` model version
of ``settings.model_name`` whose estimator is a ``FixedThresholdClassifier`` around a scaling
``Pipeline``, fitted on a DataFrame with exactly the FEATURES columns and string labels, tagged with
``data_version``, ``threshold`` and a gate decision (``gate_passed``: the rollout refuses a version
whose gate did not pass), its run holding the reference rows training stores (the rollout's
smoke test reads its hold-out rows), and reachable through the ``@champion`` alias. Swap
:func:`register_tiny_model` for the real training once ``pipelines.model_registry`` lands.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from medops.core.settings import Settings
from pipelines.schema import CLASSES, FEATURES, NEGATIVE, POSITIVE


def breast_cancer_frame() -> pd.DataFrame:
    """scikit-learn's Wisconsin data with snake_case columns and malignant/benign labels (0 is malignant)."""
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer(as_frame=True)
    frame = raw.data.rename(columns=lambda name: name.replace(" ", "_"))
    assert tuple(frame.columns) == FEATURES
    frame["diagnosis"] = raw.target.map({0: POSITIVE, 1: NEGATIVE})
    return frame


def fit_tiny_model(*, threshold: float = 0.3, classifier: Any | None = None, features: Sequence[str] = FEATURES) -> Any:
    """Fit FixedThresholdClassifier(Pipeline([scaler, classifier])) on the breast cancer data."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import FixedThresholdClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    frame = breast_cancer_frame()
    inner = Pipeline(
        [
            ("scale", StandardScaler()),
            ("classify", classifier if classifier is not None else LogisticRegression(max_iter=1000)),
        ]
    )
    model = FixedThresholdClassifier(inner, threshold=threshold, pos_label=POSITIVE, response_method="predict_proba")
    X = frame[list(features)].copy()
    if list(features) != list(FEATURES):
        X.columns = [f"{name}_v2" for name in X.columns]
    model.fit(X, frame["diagnosis"])
    assert list(model.classes_) == list(CLASSES)
    return model


def register_tiny_model(
    settings: Settings,
    *,
    threshold: float = 0.3,
    classifier: Any | None = None,
    features: Sequence[str] = FEATURES,
    data_version: str = "data-v1",
    alias: str | None = "champion",
    model: Any | None = None,
    gate_passed: bool = True,
    **log_options: Any,
) -> str:
    """Fit, log and register a tiny model version; returns the registry version (``"1"``, ``"2"``...)."""
    import mlflow

    from pipelines.data import seed_frame
    from pipelines.holdout import split_by_row_key
    from pipelines.model_registry import REFERENCE, ensure_experiment, register_trusted, write_reference
    from pipelines.model_registry import client as registry_client

    experiment_id = ensure_experiment(settings, "serving-tests")
    client = registry_client(settings)
    if model is None:
        model = fit_tiny_model(threshold=threshold, classifier=classifier, features=features)
    with mlflow.start_run(experiment_id=experiment_id), tempfile.TemporaryDirectory() as tmp:
        mlflow.log_metrics({"roc_auc": 0.99, "sensitivity": 0.97})
        if list(features) == list(FEATURES):  # reference rows are scored on the serving features
            train, holdout = split_by_row_key(seed_frame())
            reference = write_reference(model, train, holdout, Path(tmp), seed=settings.seed)
            mlflow.log_artifacts(str(reference), artifact_path=REFERENCE)
        # Explicit requirements: inferring them starts a subprocess that costs seconds per model.
        info = mlflow.sklearn.log_model(
            model, name="model", pip_requirements=["scikit-learn", "pandas", "numpy"], **log_options
        )
    uri = f"models:/{info.model_id}"
    if log_options.get("serialization_format", "skops") == "skops":
        version = register_trusted(uri, settings)  # as training registers: checked, digest recorded
    else:  # a pickled model written to MLflow past medops: what model trust must refuse to load
        version = str(mlflow.register_model(uri, settings.model_name).version)
    client.set_model_version_tag(settings.model_name, version, "data_version", data_version)
    client.set_model_version_tag(settings.model_name, version, "threshold", str(threshold))
    client.set_model_version_tag(settings.model_name, version, "gate_passed", str(gate_passed).lower())
    client.set_model_version_tag(settings.model_name, version, "gate_reason", "tiny serving-test model")
    if alias:
        client.set_registered_model_alias(settings.model_name, alias, version)
    return version


# --- a temporary MEDOPS_HOME for a whole test module, and the service in-process ----------------

API_KEY = "test-key-medops"
OTHER_KEY = "second-test-key"


@contextmanager
def serving_home(root: Path, **env: str) -> Iterator[Settings]:
    """MEDOPS_HOME under ``root`` with known API keys, for as long as the context lasts."""
    from medops.core.settings import get_settings, reset_settings

    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("MEDOPS_"):
                patch.delenv(name)
        patch.setenv("MEDOPS_HOME", str(root / "medops-home"))
        patch.setenv("MEDOPS_API_KEYS", f"{API_KEY},{OTHER_KEY}")
        for name, value in env.items():
            patch.setenv(name, value)
        reset_settings()
        try:
            yield get_settings()
        finally:
            reset_settings()


@contextmanager
def bentoml_store(settings: Settings) -> Iterator[None]:
    """Point this process's BentoML stores at ``settings.bentoml_home`` (BentoML caches them)."""
    from bentoml._internal.bento import BentoStore
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    home = settings.bentoml_home
    for sub in ("models", "bentos", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    with (
        BentoMLContainer.bentoml_home.patch(str(home)),
        BentoMLContainer.model_store.patch(ModelStore(str(home / "models"))),
        BentoMLContainer.bento_store.patch(BentoStore(str(home / "bentos"))),
    ):
        yield


@contextmanager
def service_app(settings: Settings, version: str) -> Iterator[Any]:
    """The service's ASGI app serving ``version`` from the BentoML store (model imported first)."""
    from serving.bento_build import import_model

    with bentoml_store(settings), pytest.MonkeyPatch.context() as patch:
        import_model(version, settings)
        patch.setenv("MEDOPS_SERVING_MODEL_VERSION", version)
        import serving.service as service

        assert service.MODEL_VERSION == version, "serving.service was imported for another version"
        # BentoModel caches what it resolved; this module's store is a different one
        object.__setattr__(service.MedopsService.inner.__dict__["bento_model"], "_Model__resolved", None)
        yield _asgi_app(service.MedopsService)


@functools.cache
def _asgi_app(service: Any) -> Any:
    """One ASGI app per process: BentoML registers its Prometheus metrics once per process.

    Each lifespan start (TestClient, schemathesis) creates a fresh service instance, which reads
    the settings and stores of the module that starts it.
    """
    return service.to_asgi()


def records(n: int = 3, start: int = 0) -> list[dict[str, Any]]:
    """Valid request records: the seed's rows with encounter ids."""
    frame = breast_cancer_frame()
    rows = frame[list(FEATURES)].iloc[start : start + n].to_dict("records")
    return [row | {"encounter_id": f"enc-{start + i}"} for i, row in enumerate(rows)]


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@functools.cache
def shared_registry() -> tuple[str, str]:
    """One MLflow store for every serving test module: (tracking URI, version of the tiny model).

    Creating an MLflow SQLite store costs seconds, so the modules share it (each keeps its own
    MEDOPS_HOME, BentoML store and prediction log) and point at it with MEDOPS_MLFLOW_TRACKING_URI.
    """
    root = Path(tempfile.mkdtemp(prefix="medops-serving-registry-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    with serving_home(root) as settings:
        version = register_tiny_model(settings)
        return settings.tracking_uri, version


class ClipToPlausibleRanges:
    """A feature step that only exists in the test code: a model that needs it must not be served.

    It stands for a model depending on code medops did not review: a type outside
    ``pipelines.model_trust.TRUSTED_TYPES``. Registered as cloudpickle past medops (as anyone with
    write access to MLflow could), it is refused for being pickle before anything unpickles it.
    """

    def fit(self, X: Any, y: Any = None) -> ClipToPlausibleRanges:
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X: Any) -> Any:
        return X

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {}

    def set_params(self, **params: Any) -> ClipToPlausibleRanges:
        return self


def fit_unservable_model() -> Any:
    """A correct model holding :class:`ClipToPlausibleRanges` (tests-only code)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import FixedThresholdClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    frame = breast_cancer_frame()
    steps = [("clip", ClipToPlausibleRanges()), ("scale", StandardScaler()), ("classify", LogisticRegression())]
    model = FixedThresholdClassifier(Pipeline(steps), threshold=0.3, pos_label=POSITIVE)
    return model.fit(frame[list(FEATURES)], frame["diagnosis"])


# --- continuous traffic from another process, for rollouts -------------------------------------


def run_load(url: str, key: str, out_path: str, stop_path: str, prefix: str, concurrency: int = 4) -> None:
    """Send /predict requests on keep-alive connections until ``stop_path`` exists; write a summary.

    Every record carries a unique encounter id ``<prefix>-<thread>-<n>-<i>`` so the test can find
    exactly these predictions in the log. Any exception or non-200 answer is a failed request.
    """
    import json
    import threading
    import time

    import httpx

    rows = records(3, start=50)
    lock = threading.Lock()
    summary: dict[str, Any] = {"sent": 0, "ok": 0, "predictions": 0, "failures": [], "versions": {}}

    def worker(thread: int) -> None:
        with httpx.Client(base_url=url, headers=auth(key), timeout=30) as client:
            n = 0
            while not os.path.exists(stop_path):
                size = 1 + n % 3
                body = [row | {"encounter_id": f"{prefix}-{thread}-{n}-{i}"} for i, row in enumerate(rows[:size])]
                try:
                    response = client.post("/predict", json={"records": body})
                    failure = None if response.status_code == 200 else f"{response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as error:
                    response, failure = None, f"{type(error).__name__}: {error}"
                with lock:
                    summary["sent"] += 1
                    if failure:
                        summary["failures"].append(failure)
                    else:
                        if summary["ok"] == 0:
                            Path(out_path + ".started").touch()
                        summary["ok"] += 1
                        summary["predictions"] += len(response.json()["predictions"])
                        version = response.headers.get("x-model-version", "?")
                        summary["versions"][version] = summary["versions"].get(version, 0) + 1
                n += 1
                time.sleep(0.02)  # steady traffic that leaves CPU for the rollout itself

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    Path(out_path).write_text(json.dumps(summary))


@contextmanager
def continuous_load(url: str, key: str, work_dir: Path, prefix: str, concurrency: int = 4) -> Iterator[dict[str, Any]]:
    """Run :func:`run_load` in a child process for the duration of the block; yields its summary."""
    import json
    import subprocess

    from medops.core.processes import wait_until

    out, stop = work_dir / f"{prefix}.json", work_dir / f"{prefix}.stop"
    summary: dict[str, Any] = {}
    process = subprocess.Popen(
        [sys.executable, __file__, "load", url, key, str(out), str(stop), prefix, str(concurrency)],
        cwd=Path(__file__).parent,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)])},
    )
    try:
        wait_until(
            Path(f"{out}.started").exists,
            90,
            "the load generator's first answer",
            poll=0.1,
            alive=lambda: process.poll() is None,
            hint="its errors are in the test's output",
        )
        yield summary
    finally:
        stop.touch()
        process.wait(timeout=60)
    summary.update(json.loads(out.read_text()))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "load":
    run_load(*sys.argv[2:7], concurrency=int(sys.argv[7]))
