"""How sure a hold-out figure is: binomial intervals for sensitivity and specificity, DeLong for ROC AUC.

Sensitivity and specificity get a Wilson or exact (Clopper-Pearson) interval from statsmodels; ROC
AUC gets DeLong's nonparametric variance (DeLong, DeLong and Clarke-Pearson 1988, with midranks as
in Sun and Xu 2014) and a normal interval clipped to [0, 1]; two models scored on the same rows get
the paired DeLong variance of their AUC difference. Malignant is the positive class throughout.
DeLong's variance is zero when every malignant row scores above every benign one, so a perfectly
separated small sample gets an interval of no width; the binomial intervals have no such blind
spot, which is why the gate never judges on AUC alone.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

ProportionMethod = Literal["wilson", "exact"]
CONFIDENCE = 0.95
# statsmodels' name for each method medops offers
_STATSMODELS_METHOD = {"wilson": "wilson", "exact": "beta"}


class Proportion(BaseModel):
    """A proportion (sensitivity, specificity) with its interval and the counts behind it."""

    model_config = ConfigDict(frozen=True)

    value: float
    lower: float
    upper: float
    successes: int
    total: int
    method: ProportionMethod
    confidence: float


class AucEstimate(BaseModel):
    """ROC AUC (malignant positive) with its DeLong standard error and interval."""

    model_config = ConfigDict(frozen=True)

    value: float
    lower: float
    upper: float
    standard_error: float
    positives: int
    negatives: int
    method: str = "delong"
    confidence: float = CONFIDENCE


class AucDifference(BaseModel):
    """AUC(candidate) - AUC(champion) on the same rows, with its paired interval and two-sided p-value."""

    model_config = ConfigDict(frozen=True)

    candidate: float
    champion: float
    value: float
    lower: float
    upper: float
    standard_error: float
    p_value: float | None
    positives: int
    negatives: int
    method: str = "delong"
    confidence: float = CONFIDENCE


def proportion(
    successes: int, total: int, *, method: ProportionMethod = "wilson", confidence: float = CONFIDENCE
) -> Proportion:
    """``successes / total`` with a Wilson or exact (Clopper-Pearson) interval."""
    from statsmodels.stats.proportion import proportion_confint

    if method not in _STATSMODELS_METHOD:
        raise ValueError(f"method: choose 'wilson' or 'exact', got {method!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: must lie strictly between 0 and 1, got {confidence!r}")
    if total <= 0 or not 0 <= successes <= total:
        raise ValueError(f"a proportion needs 0 <= successes <= total and total > 0, got {successes} of {total}")
    lower, upper = proportion_confint(successes, total, alpha=1.0 - confidence, method=_STATSMODELS_METHOD[method])
    return Proportion(
        value=successes / total,
        lower=float(lower),
        upper=float(upper),
        successes=int(successes),
        total=int(total),
        method=method,
        confidence=confidence,
    )


def sensitivity(
    is_malignant: np.ndarray,
    predicted_malignant: np.ndarray,
    *,
    method: ProportionMethod = "wilson",
    confidence: float = CONFIDENCE,
) -> Proportion:
    """Share of malignant rows predicted malignant, with its interval."""
    truth, predicted = _as_bool(is_malignant, "is_malignant"), _as_bool(predicted_malignant, "predicted_malignant")
    if len(truth) != len(predicted):
        lengths = sorted({len(truth), len(predicted)})
        raise ValueError(f"arrays of different lengths {lengths}: give one value per hold-out row")
    return proportion(int((truth & predicted).sum()), int(truth.sum()), method=method, confidence=confidence)


def specificity(
    is_malignant: np.ndarray,
    predicted_malignant: np.ndarray,
    *,
    method: ProportionMethod = "wilson",
    confidence: float = CONFIDENCE,
) -> Proportion:
    """Share of benign rows predicted benign, with its interval: sensitivity with the classes swapped."""
    truth, predicted = _as_bool(is_malignant, "is_malignant"), _as_bool(predicted_malignant, "predicted_malignant")
    return sensitivity(~truth, ~predicted, method=method, confidence=confidence)


def delong_covariance(is_malignant: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of k score vectors on the same rows and DeLong's k x k covariance matrix of them.

    ``scores`` is (k, rows). Each malignant row's structural component is the share of benign rows it
    outscores (ties count half), each benign row's the share of malignant rows that outscore it; the
    covariance is S10 / m + S01 / n over the m malignant and n benign rows. Midranks give all
    components in O(rows log rows) instead of comparing every pair.
    """
    from scipy.stats import rankdata

    truth = _as_bool(is_malignant, "is_malignant")
    scores = np.atleast_2d(np.asarray(scores, dtype="float64"))
    if scores.shape[1] != len(truth):
        raise ValueError(f"scores: {scores.shape[1]} per model for {len(truth)} rows")
    if not np.isfinite(scores).all():
        raise ValueError("scores: every probability must be a finite number")
    m, n = int(truth.sum()), int((~truth).sum())
    if m < 2 or n < 2:
        raise ValueError(
            f"a DeLong interval needs at least two malignant and two benign rows, got {m} malignant and {n} benign"
        )
    positive, negative = scores[:, truth], scores[:, ~truth]
    within_positive = rankdata(positive, axis=1)
    within_negative = rankdata(negative, axis=1)
    overall = rankdata(np.concatenate([positive, negative], axis=1), axis=1)
    aucs = (overall[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (overall[:, :m] - within_positive) / n  # per malignant row: share of benign rows below it
    v01 = 1.0 - (overall[:, m:] - within_negative) / m  # per benign row: share of malignant rows above it
    covariance = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, covariance


def roc_auc(is_malignant: np.ndarray, probability: np.ndarray, *, confidence: float = CONFIDENCE) -> AucEstimate:
    """ROC AUC with DeLong's standard error and a normal interval clipped to [0, 1]."""
    from scipy.stats import norm

    truth = _as_bool(is_malignant, "is_malignant")
    aucs, covariance = delong_covariance(truth, np.asarray(probability)[np.newaxis, :])
    auc, se = float(aucs[0]), float(np.sqrt(max(covariance[0, 0], 0.0)))
    z = float(norm.ppf(0.5 + confidence / 2))
    return AucEstimate(
        value=auc,
        lower=max(0.0, auc - z * se),
        upper=min(1.0, auc + z * se),
        standard_error=se,
        positives=int(truth.sum()),
        negatives=int((~truth).sum()),
        confidence=confidence,
    )


def auc_difference(
    is_malignant: np.ndarray,
    candidate_probability: np.ndarray,
    champion_probability: np.ndarray,
    *,
    confidence: float = CONFIDENCE,
) -> AucDifference:
    """AUC(candidate) - AUC(champion) on the same rows with the paired DeLong interval (clipped to [-1, 1])."""
    from scipy.stats import norm

    truth = _as_bool(is_malignant, "is_malignant")
    aucs, covariance = delong_covariance(truth, np.vstack([candidate_probability, champion_probability]))
    difference = float(aucs[0] - aucs[1])
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    se = float(np.sqrt(max(variance, 0.0)))
    z = float(norm.ppf(0.5 + confidence / 2))
    if se > 0:
        p_value: float | None = float(2 * norm.sf(abs(difference) / se))
    else:  # identical rankings of the malignant/benign pairs: no sampling variation to test
        p_value = 1.0 if difference == 0 else None
    return AucDifference(
        candidate=float(aucs[0]),
        champion=float(aucs[1]),
        value=difference,
        lower=max(-1.0, difference - z * se),
        upper=min(1.0, difference + z * se),
        standard_error=se,
        p_value=p_value,
        positives=int(truth.sum()),
        negatives=int((~truth).sum()),
        confidence=confidence,
    )


def _as_bool(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected one value per row, got shape {array.shape}")
    if array.dtype != bool:
        if not np.isin(array, [0, 1]).all():
            raise ValueError(f"{name}: expected booleans (malignant = True), got values other than 0/1")
        array = array.astype(bool)
    return array
