"""How much a fitted diagnosis model relies on each feature, as weights that sum to one.

Monitoring weighs feature drift by these weights (a shift in a feature the model ignores matters
less than one in a feature it leans on), so training computes them once and logs them with the
model version. Linear models: |coefficient| x the feature's standard deviation on the training
rows, which is exactly the coefficient on the standardised feature the model's scaler feeds it
(how far one typical variation of the feature moves the log-odds). Any other model: permutation
importance (loss of ROC AUC when a feature is shuffled) on rows it did not train on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipelines.schema import FEATURES, LABEL, POSITIVE


def feature_importance(
    model: Any, rows: pd.DataFrame, *, seed: int = 0, repeats: int = 10, features: tuple[str, ...] = FEATURES
) -> dict[str, float]:
    """Each feature's share of what ``model`` relies on (non-negative, summing to 1).

    ``rows`` are the training rows for a linear model (their standard deviations scale the raw
    coefficients) and hold-out rows with ``diagnosis`` otherwise (permutation importance).
    """
    linear = _linear_step(model)
    if linear is not None:
        coefficients, standardised = linear
        weights = np.abs(coefficients)
        if not standardised:
            weights = weights * rows[list(features)].to_numpy(dtype="float64").std(axis=0)
    else:
        weights = _permutation_weights(model, rows, seed=seed, repeats=repeats, features=features)
    return normalised(dict(zip(features, weights.tolist(), strict=True)))


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


def _linear_step(model: Any) -> tuple[np.ndarray, bool] | None:
    """(coefficients, whether they act on standardised features) when the model is linear."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    inner = getattr(model, "estimator_", model)  # FixedThresholdClassifier wraps the pipeline
    steps = inner.steps if isinstance(inner, Pipeline) else [("model", inner)]
    final, before = steps[-1][1], [step for _, step in steps[:-1]]
    if not hasattr(final, "coef_") or not all(isinstance(step, StandardScaler) for step in before):
        return None
    # Behind a StandardScaler the coefficient already is the raw one x the standard deviation.
    standardised = any(step.with_std for step in before)
    return np.asarray(final.coef_, dtype="float64").ravel(), standardised


def _permutation_weights(
    model: Any, rows: pd.DataFrame, *, seed: int, repeats: int, features: tuple[str, ...]
) -> np.ndarray:
    from sklearn.inspection import permutation_importance
    from sklearn.metrics import roc_auc_score

    if LABEL not in rows.columns:
        raise ValueError(f"permutation importance needs rows with their '{LABEL}'")
    positive = list(model.classes_).index(POSITIVE)

    def auc(estimator: Any, x: pd.DataFrame, y: np.ndarray) -> float:
        return roc_auc_score(y, estimator.predict_proba(x)[:, positive])

    found = permutation_importance(
        model,
        rows[list(features)],
        (rows[LABEL] == POSITIVE).to_numpy(),
        scoring=auc,
        n_repeats=repeats,
        random_state=seed,
    )
    return np.asarray(found.importances_mean, dtype="float64")
