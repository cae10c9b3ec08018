"""Sensitivity, specificity and PPV of a window without its labels: confidence-based performance estimation.

The champion's probabilities, once calibrated on rows whose true diagnosis is known, say how
likely each case is to be malignant. Summed over the cases the model flagged and the cases it
cleared, they give the expected confusion matrix of the window, hence the expected sensitivity,
specificity and PPV: NannyML's CBPE. NannyML itself is not used: 0.13.1 requires
``python-dateutil<3`` where the lock holds 4.0.0 (Airflow's stack), and it would bring XGBoost,
LightGBM, cloud file systems and a telemetry client for about sixty lines of arithmetic.

The stated error holds both sources of difference from what the labels will later show: the
window's cases are random draws given their probabilities (delta method), and the calibration
map was learnt from a few hundred rows (bootstrap refits). CBPE assumes the chance of
malignancy at a given score is the same as on the calibration rows; a shift in measurement (a
site's calibration) breaks that, which is why prediction and feature drift are separate signals.

Calibrate on rows the champion did not train on: its hold-out rows, or the out-of-fold
probabilities training computes to choose the operating threshold. In-sample scores are
over-confident and would make every estimate look better than it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Z_95 = 1.959963984540054


@dataclass(frozen=True)
class PerformanceEstimate:
    """Expected performance of one window's predictions, each metric with one standard error
    (``*_error``); ``None`` where a metric is undefined (no expected malignant case, nothing flagged...)."""

    n_rows: int
    expected_malignant: float
    flagged: int
    sensitivity: float | None
    sensitivity_error: float | None
    specificity: float | None
    specificity_error: float | None
    ppv: float | None
    ppv_error: float | None

    def interval(self, metric: str = "sensitivity") -> tuple[float, float] | None:
        """The 95 % interval of ``metric``, clipped to [0, 1]."""
        value, error = getattr(self, metric), getattr(self, f"{metric}_error")
        if value is None or error is None:
            return None
        return max(0.0, value - Z_95 * error), min(1.0, value + Z_95 * error)


class PerformanceEstimator:
    """Confidence-based performance estimation (CBPE) for the champion's operating point.

    ``fit(probabilities, is_malignant)`` learns an isotonic calibration map (and ``n_bootstrap``
    maps on resamples) from rows with known diagnosis; ``estimate(probabilities, flagged=None)``
    returns a window's :class:`PerformanceEstimate`. Cases at or above ``threshold`` count as
    flagged malignant, as ``FixedThresholdClassifier`` does; ``flagged`` gives the labels served.
    """

    def __init__(self, threshold: float = 0.5, n_bootstrap: int = 50, seed: int = 0):
        self.threshold = threshold
        self.n_bootstrap = n_bootstrap
        self.seed = seed

    def fit(self, probabilities: Any, is_malignant: Any) -> PerformanceEstimator:
        scores = _scores(probabilities)
        truth = np.asarray(is_malignant, dtype=bool)
        if truth.shape != scores.shape:
            raise ValueError(f"is_malignant has {truth.size} values for {scores.size} probabilities")
        if truth.all() or not truth.any():
            raise ValueError("calibration needs malignant and benign rows with known diagnosis")
        self.map_ = _isotonic(scores, truth)
        rng = np.random.default_rng(self.seed)
        resamples = (rng.integers(0, len(scores), len(scores)) for _ in range(self.n_bootstrap))
        self.bootstrap_maps_ = [
            _isotonic(scores[picks], truth[picks])
            for picks in resamples
            if truth[picks].any() and not truth[picks].all()
        ]
        return self

    def estimate(self, probabilities: Any, flagged: Any | None = None) -> PerformanceEstimate:
        scores = _scores(probabilities)
        flagged = scores >= self.threshold if flagged is None else np.asarray(flagged, dtype=bool)
        if flagged.shape != scores.shape:
            raise ValueError(f"flagged has {flagged.size} values for {scores.size} probabilities")
        found = _expected(_apply(self.map_, scores)[None, :], flagged)
        again = (
            _expected(np.stack([_apply(calibration, scores) for calibration in self.bootstrap_maps_]), flagged)
            if self.bootstrap_maps_
            else None
        )

        def value(name: str) -> float | None:
            return None if np.isnan(found[name][0]) else float(found[name][0])

        def error(name: str) -> float | None:
            if value(name) is None:
                return None
            spread = again[name][~np.isnan(again[name])] if again is not None else np.zeros(0)
            calibration = float(np.std(spread)) if len(spread) > 1 else 0.0
            return float(np.hypot(found[f"{name}_sampling_error"][0], calibration))

        return PerformanceEstimate(
            n_rows=len(scores),
            expected_malignant=float(found["expected_malignant"][0]),
            flagged=int(flagged.sum()),
            sensitivity=value("sensitivity"),
            sensitivity_error=error("sensitivity"),
            specificity=value("specificity"),
            specificity_error=error("specificity"),
            ppv=value("ppv"),
            ppv_error=error("ppv"),
        )


def _scores(probabilities: Any) -> np.ndarray:
    scores = np.asarray(probabilities, dtype="float64").ravel()
    if not np.isfinite(scores).all():
        raise ValueError("probabilities must be finite numbers (found NaN or infinity)")
    if scores.size and (scores.min() < 0 or scores.max() > 1):
        raise ValueError("probabilities must lie between 0 and 1")
    return scores


def _isotonic(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The isotonic calibration map as its breakpoints (applied with ``np.interp``, fast)."""
    from sklearn.isotonic import IsotonicRegression

    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, truth.astype("float64"))
    return fitted.X_thresholds_, fitted.y_thresholds_


def _apply(calibration: tuple[np.ndarray, np.ndarray], scores: np.ndarray) -> np.ndarray:
    return np.interp(scores, *calibration)


def _expected(chance: np.ndarray, flagged: np.ndarray) -> dict[str, np.ndarray]:
    """Expected confusion matrix from calibrated chances (one row per calibration map), metrics and sampling errors.

    Each case is a Bernoulli trial with its chance of malignancy: the true-positive count among
    flagged cases and the false-negative count among cleared ones are independent sums of such
    trials, so their variances are sums of p(1 - p); the delta method carries them to the ratios.
    NaN where a metric is undefined.
    """
    variance = chance * (1.0 - chance)
    tp, fn = chance[:, flagged].sum(axis=1), chance[:, ~flagged].sum(axis=1)
    n_flagged, n_cleared = float(flagged.sum()), float((~flagged).sum())
    fp, tn = n_flagged - tp, n_cleared - fn
    var_flagged, var_cleared = variance[:, flagged].sum(axis=1), variance[:, ~flagged].sum(axis=1)

    def ratio(hit: np.ndarray, miss: np.ndarray, var_hit: np.ndarray, var_miss: np.ndarray):
        total = hit + miss
        defined = total > 1e-12
        safe = np.where(defined, total, 1.0)
        value = np.where(defined, hit / safe, np.nan)
        error = np.where(defined, np.sqrt(miss**2 * var_hit + hit**2 * var_miss) / safe**2, 0.0)
        return value, error

    sensitivity, sensitivity_error = ratio(tp, fn, var_flagged, var_cleared)
    specificity, specificity_error = ratio(tn, fp, var_cleared, var_flagged)
    ppv = tp / n_flagged if n_flagged else np.full(len(tp), np.nan)
    return {
        "expected_malignant": tp + fn,
        "sensitivity": sensitivity,
        "sensitivity_sampling_error": sensitivity_error,
        "specificity": specificity,
        "specificity_sampling_error": specificity_error,
        "ppv": ppv,
        "ppv_sampling_error": np.sqrt(var_flagged) / n_flagged if n_flagged else np.zeros(len(tp)),
    }
