"""The clinical metrics of medops, one definition for training, the gate and monitoring.

Malignant is the positive class everywhere. A ratio whose denominator is zero (sensitivity with no
malignant row, ROC AUC with one class only, anything on no rows) is ``None``, never NaN: these
results travel as JSON (XCom, ``summary.json``, alerts, the model card), where NaN is not valid
and compares unequal to itself. Whoever needs a number decides what an undefined one means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.schema import FEATURES, LABEL, POSITIVE

if TYPE_CHECKING:
    import pandas as pd


def probability_malignant(model: Any, rows: pd.DataFrame | np.ndarray) -> np.ndarray:
    """The model's probability of malignancy for each row (a frame with the features, or an array in FEATURES order)."""
    import pandas as pd

    if isinstance(rows, pd.DataFrame):
        features = rows[list(FEATURES)]
    else:  # a model fitted on named columns warns (and may refuse) on a bare array
        features = pd.DataFrame(np.asarray(rows, dtype="float64"), columns=list(FEATURES))
    column = list(model.classes_).index(POSITIVE)
    return np.asarray(model.predict_proba(features))[:, column]


def clinical_metrics(
    is_malignant: np.ndarray, probability: np.ndarray, predicted: np.ndarray
) -> dict[str, float | int | None]:
    """ROC AUC, sensitivity, specificity, PPV, NPV, F1, accuracy, Brier score and the confusion counts.

    ``is_malignant`` and ``predicted`` are booleans (true diagnosis, the model's label at its
    operating threshold), ``probability`` is P(malignant). Undefined values are ``None``.
    """
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(is_malignant, dtype=bool)
    said = np.asarray(predicted, dtype=bool)
    scores = np.asarray(probability, dtype="float64")
    tp = int(np.sum(said & truth))
    fn = int(np.sum(~said & truth))
    tn = int(np.sum(~said & ~truth))
    fp = int(np.sum(said & ~truth))
    n = len(truth)

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    both_classes = 0 < tp + fn < n
    return {
        "roc_auc": float(roc_auc_score(truth, scores)) if both_classes else None,
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        # Brier's mean squared error, written out: scikit-learn's refuses a single-class sample.
        "brier": float(np.mean((scores - truth) ** 2)) if n else None,
        "accuracy": ratio(tp + tn, n),
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "n": n,
    }


@dataclass(frozen=True)
class Evaluation:
    """Metrics plus the probabilities and decisions behind them (for plots)."""

    metrics: dict[str, float | int | None]
    probability_malignant: np.ndarray
    is_malignant: np.ndarray
    predicted_malignant: np.ndarray


def evaluate_model(model: Any, rows: pd.DataFrame) -> Evaluation:
    """Score labelled rows with the model's own operating threshold and compute the metrics."""
    probability = probability_malignant(model, rows)
    predicted = np.asarray(model.predict(rows[list(FEATURES)])) == POSITIVE
    is_malignant = rows[LABEL].to_numpy() == POSITIVE
    return Evaluation(clinical_metrics(is_malignant, probability, predicted), probability, is_malignant, predicted)


# Feature importance ---------------------------------------------------------------------------------
LINEAR_IMPORTANCE = "linear_coefficient"
PERMUTATION_IMPORTANCE = "permutation_roc_auc"


@dataclass(frozen=True)
class FeatureImportance:
    """Each feature's share of the model's reliance on its inputs (non-negative, sums to 1)."""

    method: str
    importance: dict[str, float]


def _logistic_parts(model: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(coefficients on the scaled features, the scaler's scale) of scaler + LogisticRegression, else None."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import FixedThresholdClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if isinstance(model, FixedThresholdClassifier):
        model = getattr(model, "estimator_", model.estimator)
    if not isinstance(model, Pipeline):
        return None
    steps = [step for _, step in model.steps if step not in (None, "passthrough")]
    if len(steps) != 2 or not isinstance(steps[0], StandardScaler) or not isinstance(steps[1], LogisticRegression):
        return None
    scaler, classifier = steps
    if getattr(classifier, "coef_", np.empty(0)).shape != (1, len(FEATURES)):
        return None
    scale = scaler.scale_ if scaler.with_std else np.ones(len(FEATURES))
    return np.asarray(classifier.coef_[0], dtype="float64"), np.asarray(scale, dtype="float64")


def feature_importance(model: Any, train: pd.DataFrame, holdout: pd.DataFrame, *, seed: int) -> FeatureImportance:
    """How much the model relies on each feature, normalised to sum 1.

    Scaler + logistic regression: exact, |coefficient on the raw feature| x the feature's standard
    deviation on the training rows (the change in log-odds of a typical move of that feature).
    Any other model: permutation importance on the hold-out rows (ROC AUC lost when the feature is
    shuffled, 5 seeded repeats), losses below zero (noise) counted as none.
    """
    linear = _logistic_parts(model)
    if linear is not None:
        coefficients, scale = linear
        spread = train[list(FEATURES)].to_numpy(dtype="float64").std(axis=0)
        raw, method = np.abs(coefficients / scale) * spread, LINEAR_IMPORTANCE
    else:
        from sklearn.inspection import permutation_importance

        features, labels = holdout[list(FEATURES)], holdout[LABEL].astype(str)
        found = permutation_importance(
            model, features, labels, scoring="roc_auc", n_repeats=5, random_state=seed, n_jobs=1
        )
        raw, method = np.clip(found.importances_mean, 0.0, None), PERMUTATION_IMPORTANCE
    return FeatureImportance(method, normalised(dict(zip(FEATURES, raw.tolist(), strict=True))))


def normalised(importance: dict[str, float]) -> dict[str, float]:
    """Weights clipped at zero and scaled to sum to one (uniform when all are zero)."""
    clipped = {name: max(float(value), 0.0) for name, value in importance.items()}
    if not clipped:
        raise ValueError("importance names no feature")
    if any(not np.isfinite(value) for value in clipped.values()):
        raise ValueError("importance holds a value that is not a finite number")
    total = sum(clipped.values())
    if total <= 0:
        return dict.fromkeys(clipped, 1.0 / len(clipped))
    return {name: value / total for name, value in clipped.items()}
