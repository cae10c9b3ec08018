"""Generated monitoring windows whose truth is known: what the monitoring-power benchmark judges.

A champion is fitted on the seed's training split exactly as :mod:`pipelines.train` fits a
logistic regression (same split, search, operating threshold). Windows are drawn from the
hold-out rows it never saw, each value times ``1 + N(0, noise)`` (measurement noise), scored by
the champion as the service scores them, with the prediction log's columns, ``/feedback``
labels for a share of them and the per-site counts of scored and refused records.

Every window mixes four sites: ``site-d`` sends ``affected_share`` of the records (half by
default: a busy new site, as in the issue) and is the one a scenario changes; ``site-a`` to
``site-c`` share the rest and stay calm. Every site has a small baseline of refused records
(a field missing in ``baseline_refusal`` of them), as real traffic has.

Scenarios (:data:`SCENARIOS`): calm resamples; a calibration-type shift (x1.1, x1.25, x1.5) of
the three features the champion relies on most; a x1.25 shift of only the features it nearly
ignores (together at most 5 % of its weight); a prevalence change (80 % malignant at site-d);
values in the wrong unit (half of site-d's records with radius and perimeter in tenths of a
millimetre: refused as out of range); a concept shift (15 % of site-d's benign-looking cases are
malignant after all, seen only in the feedback labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from monitoring.drift import ENCOUNTER_HASH, PREDICTED_LABEL, PROBABILITY
from monitoring.signals import SiteTraffic
from pipelines.schema import FEATURE_RANGES, FEATURES, LABEL, NEGATIVE, POSITIVE, SITE

if TYPE_CHECKING:
    from medops.core.settings import Settings
    from monitoring.estimation import PerformanceEstimator

AFFECTED_SITE = "site-d"
CALM_SITES = ("site-a", "site-b", "site-c")
WRONG_UNIT_FEATURES = ("mean_radius", "worst_radius", "mean_perimeter", "worst_perimeter")
WRONG_UNIT_FACTOR = 10.0
SHIFTED_TOP_FEATURES = 3
IGNORED_WEIGHT = 0.05


@dataclass(frozen=True)
class Scenario:
    """What a scenario changes at the affected site, and the verdicts that count as catching it."""

    name: str
    description: str
    caught_by: tuple[str, ...] = ()
    shift: str | None = None  # "top" (most important features) or "ignored"
    factor: float = 1.0
    prevalence: float | None = None
    wrong_unit_share: float = 0.0
    concept_share: float = 0.0


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario("calm", "resampled hold-out rows, nothing changed"),
        *(
            Scenario(
                f"important_x{factor:g}",
                f"3 most important features x{factor:g} at site-d",
                ("drift", "performance_drop"),
                shift="top",
                factor=factor,
            )
            for factor in (1.1, 1.25, 1.5)
        ),
        Scenario(
            "ignored_x1.25",
            "features with <= 5 % of the weight x1.25 at site-d",
            ("drift", "performance_drop"),
            shift="ignored",
            factor=1.25,
        ),
        Scenario("prevalence_80", "site-d at 80 % malignant", ("drift", "performance_drop"), prevalence=0.8),
        Scenario(
            "wrong_unit",
            "half of site-d's radius/perimeter values x10 (refused)",
            ("data_quality",),
            wrong_unit_share=0.5,
        ),
        Scenario(
            "concept_shift",
            "15 % of site-d's benign cases malignant (labels only)",
            ("performance_drop",),
            concept_share=0.15,
        ),
    )
}


@dataclass(frozen=True)
class Champion:
    """A champion fitted as training fits one, and what monitoring needs from its training run."""

    model: Any
    threshold: float
    reference: pd.DataFrame
    holdout: pd.DataFrame
    importance: dict[str, float]
    estimator: PerformanceEstimator


@dataclass
class Window:
    """One generated window: prediction-log rows, feedback labels, per-site traffic and the truth."""

    scenario: str
    current: pd.DataFrame
    feedback: pd.DataFrame
    traffic: dict[str, SiteTraffic]
    truth: dict[str, Any] = field(default_factory=dict)


SCENARIO_HOLDOUT_SHARE = 0.2


def reference_split(frame: pd.DataFrame, settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, held-out rows) of the scenarios' champion: stratified, fixed seed.

    Training itself splits by the modification protocol's row hash (:mod:`pipelines.holdout`); the
    scenarios keep the stratified split their effect sizes and the monitoring-power thresholds were
    calibrated on, so switching it is a recalibration of the monitoring bench, not a refactoring.
    """
    from sklearn.model_selection import train_test_split

    train, holdout = train_test_split(
        frame, test_size=SCENARIO_HOLDOUT_SHARE, stratify=frame[LABEL], random_state=settings.seed
    )
    return train.reset_index(drop=True), holdout.reset_index(drop=True)


def fit_champion(settings: Settings, frame: pd.DataFrame | None = None) -> Champion:
    """Logistic regression on the training split of ``frame`` (the seed by default), as training fits it.

    The performance estimator is calibrated on the out-of-fold probabilities of the training rows,
    the ones training computes to choose its threshold (never on in-sample scores).
    """
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from threadpoolctl import threadpool_limits

    from monitoring.estimation import PerformanceEstimator
    from pipelines.data import seed_frame
    from pipelines.metrics import feature_importance, probability_malignant
    from pipelines.train import choose_threshold, fit_final, search_best

    frame = seed_frame() if frame is None else frame
    train, holdout = reference_split(frame, settings)
    with threadpool_limits(limits=1):
        _, estimator, _ = search_best(train, ["logistic_regression"], settings)
        threshold = choose_threshold(estimator, train, settings.sensitivity_target, settings)
        model = fit_final(estimator, threshold, train)
        cv = StratifiedKFold(n_splits=settings.cv_folds, shuffle=True, random_state=settings.seed)
        out_of_fold = cross_val_predict(
            clone(estimator), train[list(FEATURES)], train[LABEL] == POSITIVE, cv=cv, method="predict_proba"
        )[:, 1]
    reference = train.assign(**{PROBABILITY: probability_malignant(model, train)})
    importance = feature_importance(model, train, holdout, seed=settings.seed).importance
    cbpe = PerformanceEstimator(threshold, seed=settings.seed).fit(out_of_fold, train[LABEL] == POSITIVE)
    return Champion(model, threshold, reference, holdout, importance, cbpe)


def shifted_features(scenario: Scenario, importance: dict[str, float]) -> list[str]:
    """The features a shift scenario scales: the three most important, or the nearly ignored ones."""
    ranked = sorted(importance, key=lambda name: -importance[name])
    if scenario.shift == "top":
        return ranked[:SHIFTED_TOP_FEATURES]
    if scenario.shift == "ignored":
        chosen, weight = [], 0.0
        for name in reversed(ranked):
            if weight + importance[name] > IGNORED_WEIGHT:
                break
            chosen.append(name)
            weight += importance[name]
        return chosen
    return []


def generate_window(
    scenario: str | Scenario,
    rows: int,
    champion: Champion,
    rng: np.random.Generator,
    *,
    affected_share: float = 0.5,
    noise: float = 0.02,
    feedback_share: float = 0.6,
    baseline_refusal: float = 0.01,
) -> Window:
    """``rows`` records sent to the service in one window under ``scenario`` (see the module)."""
    scenario = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    if rows < 1:
        raise ValueError("a window needs at least one record")
    holdout = champion.holdout
    pool = holdout[list(FEATURES)].to_numpy(dtype="float64")
    malignant = (holdout[LABEL] == POSITIVE).to_numpy()

    affected_rows = int(round(rows * affected_share))
    sites = np.concatenate(
        [
            np.full(affected_rows, AFFECTED_SITE),
            np.asarray(CALM_SITES)[rng.integers(0, len(CALM_SITES), rows - affected_rows)],
        ]
    )
    rng.shuffle(sites)
    affected = sites == AFFECTED_SITE

    picks = rng.integers(0, len(pool), rows)
    if scenario.prevalence is not None:
        want_malignant = rng.random(rows) < scenario.prevalence
        from_class = np.where(
            want_malignant,
            rng.choice(np.flatnonzero(malignant), rows),
            rng.choice(np.flatnonzero(~malignant), rows),
        )
        picks = np.where(affected, from_class, picks)
    values = pool[picks] * (1.0 + rng.normal(0.0, noise, (rows, len(FEATURES))))
    truth = malignant[picks].copy()

    for name in shifted_features(scenario, champion.importance):
        values[affected, FEATURES.index(name)] *= scenario.factor
    if scenario.concept_share:
        truth |= affected & ~truth & (rng.random(rows) < scenario.concept_share)
    if scenario.wrong_unit_share:
        wrong = affected & (rng.random(rows) < scenario.wrong_unit_share)
        for name in WRONG_UNIT_FEATURES:
            values[wrong, FEATURES.index(name)] *= WRONG_UNIT_FACTOR
    missing = rng.random(rows) < baseline_refusal
    values[missing, rng.integers(0, len(FEATURES), int(missing.sum()))] = np.nan

    refused, traffic = _refusals(values, sites)
    kept = ~refused
    current = pd.DataFrame(values[kept], columns=list(FEATURES))
    current[SITE] = sites[kept]
    probability = champion.model.predict_proba(current[list(FEATURES)])[
        :, list(champion.model.classes_).index(POSITIVE)
    ]
    current[PROBABILITY] = probability
    current[PREDICTED_LABEL] = np.where(probability >= champion.threshold, POSITIVE, NEGATIVE)
    current[ENCOUNTER_HASH] = [f"e{i:06d}" for i in range(len(current))]
    current["model_version"] = "1"

    labelled = rng.random(len(current)) < feedback_share
    feedback = pd.DataFrame(
        {
            ENCOUNTER_HASH: current[ENCOUNTER_HASH].to_numpy()[labelled],
            LABEL: np.where(truth[kept], POSITIVE, NEGATIVE)[labelled],
        }
    )
    flagged = probability >= champion.threshold
    site_truth = truth[kept][current[SITE].to_numpy() == AFFECTED_SITE]
    site_flagged = flagged[current[SITE].to_numpy() == AFFECTED_SITE]
    facts = {
        "requests": rows,
        "scored": int(kept.sum()),
        "affected_site": AFFECTED_SITE,
        "affected_sensitivity": float(site_flagged[site_truth].mean()) if site_truth.any() else None,
        "affected_flagged_rate": float(site_flagged.mean()) if len(site_flagged) else None,
        "window_sensitivity": float(flagged[truth[kept]].mean()) if truth[kept].any() else None,
    }
    return Window(scenario.name, current, feedback, traffic, facts)


def _refusals(values: np.ndarray, sites: np.ndarray) -> tuple[np.ndarray, dict[str, SiteTraffic]]:
    """Which records the service refuses (a missing value, or one outside the plausible range), per site and field."""
    low = np.array([FEATURE_RANGES[name][0] for name in FEATURES])
    high = np.array([FEATURE_RANGES[name][1] for name in FEATURES])
    missing = np.isnan(values)
    with np.errstate(invalid="ignore"):
        outside = (values < low) | (values > high)
    refused = (missing | outside).any(axis=1)
    traffic = {}
    for site in sorted(set(sites.tolist())):
        mine = sites == site
        by_field: dict[str, dict[str, int]] = {}
        for reason, mask in (("missing", missing), ("out_of_range", outside)):
            counts = mask[mine].sum(axis=0)
            for index in np.flatnonzero(counts):
                by_field.setdefault(FEATURES[index], {})[reason] = int(counts[index])
        traffic[site] = SiteTraffic(site, int((mine & ~refused).sum()), int((mine & refused).sum()), by_field)
    return refused, traffic


def scenario_effect(
    scenario: str | Scenario, champion: Champion, rng: np.random.Generator, rows: int = 20_000
) -> dict[str, Any]:
    """How much a scenario moves the champion at the affected site, on a large sample.

    ``prediction_shift`` is the K-S distance between the affected site's scores and calm scores;
    ``sensitivity`` the true sensitivity there. A scenario "moves the champion" when the shift is
    at least 0.05 or the sensitivity falls below the gate.
    """
    from scipy.stats import ks_2samp

    scenario = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    changed = generate_window(
        scenario, rows, champion, rng, affected_share=1.0, feedback_share=0.0, baseline_refusal=0.0
    )
    calm = generate_window("calm", rows, champion, rng, affected_share=1.0, feedback_share=0.0, baseline_refusal=0.0)
    shift = (
        float(ks_2samp(changed.current[PROBABILITY], calm.current[PROBABILITY]).statistic)
        if len(changed.current)
        else 0.0
    )
    return {
        "prediction_shift": round(shift, 4),
        "sensitivity": changed.truth["affected_sensitivity"],
        "flagged_rate": changed.truth["affected_flagged_rate"],
        "calm_flagged_rate": calm.truth["affected_flagged_rate"],
        "refused_share": round(1 - changed.truth["scored"] / rows, 4),
    }
