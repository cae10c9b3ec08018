"""CBPE: estimated sensitivity, specificity and PPV against windows whose true performance is known."""

from __future__ import annotations

import numpy as np
import pytest

from monitoring.estimation import PerformanceEstimate, PerformanceEstimator


def _scores(rng: np.random.Generator, n: int, prevalence: float = 0.37) -> np.ndarray:
    """Bimodal scores like a good diagnostic model's: most cases near 0 or 1, some in between."""
    malignant_like = rng.random(n) < prevalence
    return np.where(malignant_like, rng.beta(5, 1.2, n), rng.beta(1.2, 6, n))


def _truth_of(rng: np.random.Generator, scores: np.ndarray, bend: float) -> np.ndarray:
    """Diagnoses drawn from a true chance of malignancy that differs from the score (miscalibration)."""
    return rng.random(len(scores)) < scores**bend


@pytest.mark.parametrize("seed", [4, 5, 6])
@pytest.mark.parametrize("bend", [1.0, 1.6])
def test_estimates_hold_the_true_sensitivity_within_their_stated_error(bend, seed):
    rng = np.random.default_rng(seed)
    reference = _scores(rng, 455)
    estimator = PerformanceEstimator(threshold=0.3, seed=1).fit(reference, _truth_of(rng, reference, bend))
    inside, errors, widths = 0, [], []
    windows = 300
    for _ in range(windows):
        scores = _scores(rng, 300)
        truth = _truth_of(rng, scores, bend)
        flagged = scores >= 0.3
        realized = (flagged & truth).sum() / truth.sum()
        found = estimator.estimate(scores)
        low, high = found.interval("sensitivity")
        inside += low <= realized <= high
        errors.append(found.sensitivity - realized)
        widths.append(found.sensitivity_error)
    # Measured: 85-96 % of windows inside the 95 % interval, depending on the calibration rows drawn
    # (the bootstrap of an isotonic map understates its own error a little). What is left over
    # after averaging 300 windows is the calibration rows' own error, and it lies within the stated
    # error; which is small enough to be useful against a gate at 0.95.
    assert inside / windows >= 0.84
    assert abs(np.mean(errors)) <= np.mean(widths)
    assert np.mean(widths) < 0.04


def test_estimate_is_the_expected_confusion_matrix_of_calibrated_chances():
    estimator = PerformanceEstimator(threshold=0.5, n_bootstrap=0)
    # Calibration rows where the true chance is exactly 0.1 below and 0.8 above the threshold.
    scores = np.r_[np.full(1000, 0.2), np.full(1000, 0.7)]
    truth = np.r_[np.arange(1000) < 100, np.arange(1000) < 800]
    estimator.fit(scores, truth)
    found = estimator.estimate(np.r_[np.full(50, 0.2), np.full(50, 0.7)])
    # Expected: TP 40, FP 10 among flagged; FN 5, TN 45 among cleared.
    assert found.expected_malignant == pytest.approx(45.0)
    assert found.flagged == 50
    assert found.sensitivity == pytest.approx(40 / 45)
    assert found.specificity == pytest.approx(45 / 55)
    assert found.ppv == pytest.approx(40 / 50)
    # Sampling error of PPV: sqrt(50 * 0.8 * 0.2) / 50.
    assert found.ppv_error == pytest.approx(np.sqrt(50 * 0.16) / 50)


def test_served_labels_override_the_threshold():
    rng = np.random.default_rng(0)
    reference = _scores(rng, 400)
    estimator = PerformanceEstimator(threshold=0.5).fit(reference, _truth_of(rng, reference, 1.0))
    scores = _scores(rng, 200)
    nobody_flagged = estimator.estimate(scores, flagged=np.zeros(200, dtype=bool))
    assert nobody_flagged.flagged == 0 and nobody_flagged.sensitivity == 0.0 and nobody_flagged.ppv is None


def test_bad_input_is_refused_with_the_reason():
    estimator = PerformanceEstimator()
    with pytest.raises(ValueError, match="malignant and benign"):
        estimator.fit([0.1, 0.2, 0.9], [False, False, False])
    with pytest.raises(ValueError, match="values for"):
        estimator.fit([0.1, 0.9], [True])
    estimator.fit([0.1, 0.2, 0.8, 0.9], [False, False, True, True])
    with pytest.raises(ValueError, match="finite"):
        estimator.estimate([0.2, float("nan")])
    with pytest.raises(ValueError, match="between 0 and 1"):
        estimator.estimate([1.5])


def test_estimator_contract_and_interval():
    estimator = PerformanceEstimator(threshold=0.25, n_bootstrap=5, seed=3)
    assert vars(estimator) == {"threshold": 0.25, "n_bootstrap": 5, "seed": 3}  # __init__ stores parameters only
    assert estimator.fit([0.1, 0.2, 0.8, 0.9], [False, True, False, True]) is estimator
    assert len(estimator.bootstrap_maps_) <= 5
    estimate = PerformanceEstimate(100, 30.0, 31, 0.9, 0.05, 0.95, 0.01, 0.87, 0.02)
    low, high = estimate.interval("sensitivity")
    assert low == pytest.approx(0.9 - 1.96 * 0.05, abs=1e-3) and high == pytest.approx(0.9 + 1.96 * 0.05, abs=1e-3)
    assert PerformanceEstimate(10, 0.0, 0, None, None, 1.0, 0.0, None, None).interval("sensitivity") is None
