"""The model as the service uses it: probability of malignancy, label and per-feature explanation.

The registered estimator is a scikit-learn ``FixedThresholdClassifier`` around a scaling
``Pipeline``. Scoring one record through scikit-learn costs far more in input checking than in
arithmetic, so when the pipeline is ``StandardScaler`` + ``LogisticRegression`` the same arithmetic
is done directly on a numpy array (same operations in the same order). That fast path is only
used after it reproduced the estimator's own ``predict_proba`` and ``predict`` on reference rows
at load; any other model goes through scikit-learn (and shap for explanations).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.metrics import probability_malignant
from pipelines.model_trust import DIGEST_KEY, load_trusted
from pipelines.schema import CLASSES, FEATURE_RANGES, FEATURES, NEGATIVE, POSITIVE

logger = logging.getLogger("medops.serving")

MLFLOW_MODEL_DIR = "mlflow_model"  # where bentoml.mlflow.import_model puts the MLflow model
_LOW = np.array([FEATURE_RANGES[name][0] for name in FEATURES])
_HIGH = np.array([FEATURE_RANGES[name][1] for name in FEATURES])


class IncompatibleModel(RuntimeError):
    """The registered model does not fit the serving contract (features, classes)."""


def reference_rows(n: int = 64, seed: int = 0) -> np.ndarray:
    """Deterministic rows spread over the plausible ranges, for self-checks of a loaded model."""
    rng = np.random.default_rng(seed)
    return _LOW + rng.random((n, len(FEATURES))) * (_HIGH - _LOW) * rng.choice([0.05, 0.2, 1.0], (n, 1))


@dataclass(frozen=True)
class _LinearForm:
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float


def _unwrap(estimator: Any) -> tuple[Any, float | None]:
    """(inner fitted estimator, probability threshold) of a FixedThresholdClassifier, else (it, None)."""
    from sklearn.model_selection import FixedThresholdClassifier

    if isinstance(estimator, FixedThresholdClassifier):
        inner = getattr(estimator, "estimator_", estimator.estimator)
        if estimator.pos_label not in (None, POSITIVE):
            return estimator, None
        method = estimator.response_method
        if method == "predict_proba" or (method == "auto" and hasattr(inner, "predict_proba")):
            return inner, 0.5 if estimator.threshold == "auto" else float(estimator.threshold)
    return estimator, None


def _linear_form(inner: Any) -> _LinearForm | None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if not isinstance(inner, Pipeline):
        return None
    steps = [step for _, step in inner.steps if step not in (None, "passthrough")]
    if len(steps) != 2:
        return None
    scaler, classifier = steps
    if not (isinstance(scaler, StandardScaler) and isinstance(classifier, LogisticRegression)):
        return None
    if classifier.coef_.shape != (1, len(FEATURES)) or list(classifier.classes_) != list(CLASSES):
        return None
    mean = scaler.mean_ if scaler.with_mean else np.zeros(len(FEATURES))
    scale = scaler.scale_ if scaler.with_std else np.ones(len(FEATURES))
    return _LinearForm(
        mean=np.asarray(mean, dtype=float),
        scale=np.asarray(scale, dtype=float),
        coef=np.asarray(classifier.coef_[0], dtype=float),
        intercept=float(classifier.intercept_[0]),
    )


@dataclass(frozen=True)
class ExplainResult:
    method: str
    score_kind: str
    scores: np.ndarray
    base_values: np.ndarray
    contributions: np.ndarray  # (n_records, n_features)


@dataclass
class ServingModel:
    """One loaded model version, ready to score; immutable once built (swapped as a whole)."""

    name: str
    version: str
    estimator: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    fast: _LinearForm | None = None
    _explainer: Any = None

    @classmethod
    def from_estimator(
        cls, name: str, version: str, estimator: Any, metadata: dict[str, Any] | None = None
    ) -> ServingModel:
        """Check the estimator against the contract and pick (and verify) the fastest exact path."""
        classes = [str(label) for label in getattr(estimator, "classes_", [])]
        if sorted(classes) != sorted(CLASSES):
            raise IncompatibleModel(f"model {name}:{version} predicts {classes}, expected {list(CLASSES)}")
        names = getattr(estimator, "feature_names_in_", None)
        if names is not None and tuple(names) != FEATURES:
            raise IncompatibleModel(f"model {name}:{version} was trained on other features than the serving schema")
        inner, threshold = _unwrap(estimator)
        fast = _linear_form(inner) if threshold is not None else None
        model = cls(name, str(version), estimator, dict(metadata or {}), threshold, fast)
        if fast is not None and not model._fast_path_agrees():
            logger.warning("fast scoring of %s:%s disagrees with scikit-learn; not used", name, version)
            model.fast = None
        return model

    # scoring -------------------------------------------------------------------------------
    def _frame(self, X: np.ndarray):
        import pandas as pd

        return pd.DataFrame(X, columns=list(FEATURES))

    def probability_malignant(self, X: np.ndarray) -> np.ndarray:
        fast = self.fast
        if fast is not None:
            from scipy.special import expit

            return expit(((X - fast.mean) / fast.scale) @ fast.coef + fast.intercept)
        return probability_malignant(self.estimator, X)

    def labels(self, X: np.ndarray, probabilities: np.ndarray) -> list[str]:
        if self.threshold is not None:
            return np.where(probabilities >= self.threshold, POSITIVE, NEGATIVE).tolist()
        return [str(label) for label in self.estimator.predict(self._frame(X))]

    @property
    def is_fast(self) -> bool:
        return self.fast is not None

    def _fast_path_agrees(self) -> bool:
        X = reference_rows()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = probability_malignant(self.estimator, X)
            expected_labels = [str(label) for label in self.estimator.predict(self._frame(X))]
        got = self.probability_malignant(X)
        return bool(np.allclose(got, expected, rtol=0, atol=1e-12)) and self.labels(X, got) == expected_labels

    # explanation -----------------------------------------------------------------------------
    @property
    def explain_method(self) -> str:
        return "linear-exact" if self.fast is not None else "shap-permutation"

    def explain(self, X: np.ndarray) -> ExplainResult:
        """Per-feature contributions that add up to ``score - base_value`` for every record."""
        fast = self.fast
        if fast is not None:
            contributions = ((X - fast.mean) / fast.scale) * fast.coef
            base = np.full(len(X), fast.intercept)
            scores = contributions.sum(axis=1) + base
            return ExplainResult("linear-exact", "log_odds", scores, base, contributions)
        explanation = self._shap_explainer()(X)
        values = np.asarray(explanation.values, dtype=float)
        base = np.asarray(explanation.base_values, dtype=float).reshape(len(X))
        return ExplainResult("shap-permutation", "probability", self.probability_malignant(X), base, values)

    def _shap_explainer(self) -> Callable[[np.ndarray], Any]:
        if self._explainer is None:
            shap = _import_shap()
            background = _shap_background()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._explainer = shap.PermutationExplainer(
                    self.probability_malignant,
                    shap.maskers.Independent(background, max_samples=len(background)),
                    feature_names=list(FEATURES),
                )
        return self._explainer


def _import_shap() -> Any:
    """shap, imported on a thread of its own: shap keeps the ImportError of every optional package it lacks
    (cv2, pyspark...) with its traceback for good, and imported from a request those frames would keep that
    request's model (estimator, explainer) alive for the worker's life."""

    def load() -> Any:
        import shap

        return shap

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(load).result()


def _shap_background(n: int = 50) -> np.ndarray:
    """Rows of the seed population (scikit-learn's copy of the Wisconsin data) to explain against."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer().data
    rng = np.random.default_rng(0)
    return data[rng.choice(len(data), size=min(n, len(data)), replace=False)]


def model_from_store(name: str, version: str) -> ServingModel:
    """Load ``name:version`` from the BentoML model store (BENTOML_HOME) as a ServingModel."""
    import bentoml

    return model_from_stored(bentoml.models.get(f"{name}:{version}"))


def model_from_stored(stored: Any) -> ServingModel:
    """A BentoML store model as a ServingModel; its artifact must match the digest recorded at import.

    Only skops, only medops' own list of types, only the recorded bytes (:mod:`pipelines.model_trust`).
    Loaded without importing mlflow, which would add seconds to every worker's start; the rollout's
    smoke test compares the served predictions with the registry's loading of the same version.
    """
    metadata = dict(stored.info.metadata)
    what = f"model version {stored.tag.version} of {stored.tag.name} (BentoML store)"
    estimator = load_trusted(Path(stored.path_of(MLFLOW_MODEL_DIR)), metadata.get(DIGEST_KEY), what)
    return ServingModel.from_estimator(stored.tag.name, stored.tag.version, estimator, metadata)
