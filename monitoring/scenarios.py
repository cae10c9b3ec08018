"""Generated monitoring windows whose truth is known: what the monitoring-power benchmark judges.

Rows come from a population model of the seed (:class:`Population`): per class, a Gaussian
copula with the seed's own empirical marginals (all 569 seed rows, the class's sorted values
interpolated) and the correlation of the features' normal scores. A champion is fitted on 455
rows drawn from it (the seed's stratified training split's class counts) exactly as
:mod:`pipelines.train` fits a logistic regression (same search, operating threshold); windows
are fresh draws from the same population (rows the champion never trained on), scored by the
champion as the service scores them, with the prediction log's columns, ``/feedback`` labels for
a share of them and the per-site counts of scored and refused records. So, as in real traffic,
every window is a new sample and only the reference carries its own (455-row) sampling noise.

Why this generator: the marginals are the seed's own, so nothing about a feature's range, skew or
zeros is invented; a per-class Gaussian copula keeps the strong monotone dependence between the
features (radius, perimeter and area are nearly one quantity) that a model and Hotelling's T²
see, and the class mixture keeps the bimodality. How faithful (measured with seed 1;
``test_generated_rows_score_like_real_rows`` re-checks it at 5,000 rows):

- marginals: a two-sample K-S test of each of the 30 features, per class, generated vs the seed's
  rows of that class, rejects none of the 60 at 5 % (smallest p 0.17) with as many generated rows
  as the seed has, and none with 5,000 (smallest p 0.999);
- the champion fitted on the seed's real training split scores its 114 real hold-out rows and
  20,000 generated rows alike: AUC 0.996 / 0.993, sensitivity 0.976 / 0.972, specificity
  0.958 / 0.938, flagged 38.6 % / 40.1 %, K-S distance between the scores 0.061 (114 rows: the
  5 % critical value is about 0.13);
- the scenarios' champion (trained on generated rows) on all 569 real seed rows, none of which
  it saw, and on 20,000 generated ones: AUC 0.994 / 0.992, sensitivity 0.962 / 0.957,
  specificity 0.972 / 0.955, flagged 37.6 % / 38.5 %, score K-S distance 0.021.

Generated cases are slightly harder than real ones (specificity 1.5 to 2 points lower: under
one standard error on 72 real benign rows, about two on 357); a likely cause is that a Gaussian
copula has no tail dependence, so a few benign draws combine extreme values less consistently
than real tumours do. Windows get no extra measurement noise: the seed's values carry theirs
already, and noise on the windows only would be a calm difference of its own.

Every window mixes four sites: ``site-d`` sends ``affected_share`` of the records (half by
default: a busy new site, as in the issue) and is the one a scenario changes; ``site-a`` to
``site-c`` share the rest and stay calm. Every site has a small baseline of refused records
(a field missing in ``baseline_refusal`` of them), as real traffic has.

Scenarios (:data:`SCENARIOS`): calm windows; a calibration-type shift (x1.1, x1.25, x1.5) of
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
from pipelines.metrics import probability_malignant
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
    caught_by: tuple[str, ...] = ()
    shift: str | None = None  # "top" (most important features) or "ignored"
    factor: float = 1.0
    prevalence: float | None = None
    wrong_unit_share: float = 0.0
    concept_share: float = 0.0


_CHANGES_THE_MODEL = ("drift", "performance_drop")
SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario("calm"),
        *(
            Scenario(f"important_x{factor:g}", _CHANGES_THE_MODEL, shift="top", factor=factor)
            for factor in (1.1, 1.25, 1.5)
        ),
        Scenario("ignored_x1.25", _CHANGES_THE_MODEL, shift="ignored", factor=1.25),
        Scenario("prevalence_80", _CHANGES_THE_MODEL, prevalence=0.8),
        Scenario("wrong_unit", ("data_quality",), wrong_unit_share=0.5),  # refused as out of range
        Scenario("concept_shift", ("performance_drop",), concept_share=0.15),  # seen in the labels only
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
    population: Population


@dataclass
class Window:
    """One generated window: prediction-log rows, feedback labels, per-site traffic and the truth."""

    scenario: str
    current: pd.DataFrame
    feedback: pd.DataFrame
    traffic: dict[str, SiteTraffic]
    truth: dict[str, Any] = field(default_factory=dict)


SCENARIO_HOLDOUT_SHARE = 0.2


@dataclass(frozen=True)
class Population:
    """The seed's population, per class: a Gaussian copula with the seed's own marginals.

    For each class, every feature keeps the seed's empirical distribution (the quantile function
    interpolated between its sorted values at ``(i + 0.5) / n``, so draws stay inside the seed's
    range and every zero concavity stays possible); the dependence is the correlation of the
    features' normal scores (rank -> ``Phi^-1``).
    """

    prevalence: float
    sorted_values: dict[bool, np.ndarray]  # class -> (rows of that class, features), each column sorted
    cholesky: dict[bool, np.ndarray]  # class -> Cholesky factor of the normal scores' correlation

    @classmethod
    def of(cls, frame: pd.DataFrame) -> Population:
        from scipy.stats import norm, rankdata

        malignant = (frame[LABEL] == POSITIVE).to_numpy()
        values = frame[list(FEATURES)].to_numpy(dtype="float64")
        sorted_values, cholesky = {}, {}
        for label in (True, False):
            rows = values[malignant == label]
            scores = norm.ppf(rankdata(rows, axis=0) / (len(rows) + 1))
            correlation = np.corrcoef(scores, rowvar=False)
            eigen, vectors = np.linalg.eigh(correlation)
            correlation = (vectors * np.clip(eigen, 1e-6, None)) @ vectors.T  # positive definite
            scale = np.sqrt(np.diag(correlation))
            cholesky[label] = np.linalg.cholesky(correlation / np.outer(scale, scale))
            sorted_values[label] = np.sort(rows, axis=0)
        return cls(float(malignant.mean()), sorted_values, cholesky)

    def features(self, malignant: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One fresh row of features for each entry of ``malignant`` (its class)."""
        from scipy.stats import norm

        values = np.empty((len(malignant), len(FEATURES)))
        for label in (True, False):
            mine = np.flatnonzero(malignant == label)
            uniform = norm.cdf(rng.standard_normal((len(mine), len(FEATURES))) @ self.cholesky[label].T)
            table = self.sorted_values[label]
            positions = (np.arange(len(table)) + 0.5) / len(table)
            for column in range(len(FEATURES)):
                values[mine, column] = np.interp(uniform[:, column], positions, table[:, column])
        return values

    def draw(self, counts: tuple[int, int], rng: np.random.Generator) -> pd.DataFrame:
        """``counts`` = (malignant, benign) fresh labelled rows, shuffled."""
        malignant = np.concatenate([np.ones(counts[0], dtype=bool), np.zeros(counts[1], dtype=bool)])
        rng.shuffle(malignant)
        frame = pd.DataFrame(self.features(malignant, rng), columns=list(FEATURES))
        frame[LABEL] = np.where(malignant, POSITIVE, NEGATIVE)
        return frame


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


def fit_champion(settings: Settings, frame: pd.DataFrame | None = None, sample_seed: int | None = None) -> Champion:
    """Logistic regression fitted as training fits one, on rows drawn from the population of ``frame``.

    ``frame`` (the seed by default) gives, through its :class:`Population`, the champion's training
    rows (the reference, 455, as many of each class as the seed's stratified training split) and a
    hold-out (114), fresh draws of ``sample_seed`` (default ``settings.seed``). The performance
    estimator is calibrated on the training rows' out-of-fold probabilities, never in-sample scores.
    """
    from pipelines.data import seed_frame

    frame = seed_frame() if frame is None else frame
    population = Population.of(frame)
    real_train, real_holdout = reference_split(frame, settings)
    rng = np.random.default_rng([settings.seed if sample_seed is None else sample_seed, 455])
    train, holdout = (
        population.draw((int((rows[LABEL] == POSITIVE).sum()), int((rows[LABEL] != POSITIVE).sum())), rng)
        for rows in (real_train, real_holdout)
    )
    return fit_on(train, holdout, settings, population)


def fit_on(train: pd.DataFrame, holdout: pd.DataFrame, settings: Settings, population: Population) -> Champion:
    """The champion :func:`fit_champion` fits, on the given training and hold-out rows (real ones, too)."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from threadpoolctl import threadpool_limits

    from monitoring.estimation import PerformanceEstimator
    from pipelines.metrics import feature_importance
    from pipelines.train import choose_threshold, fit_final, search_best

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
    return Champion(model, threshold, reference, holdout, importance, cbpe, population)


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
    feedback_share: float = 0.6,
    baseline_refusal: float = 0.01,
) -> Window:
    """``rows`` records sent to the service in one window under ``scenario`` (see the module)."""
    scenario = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    if rows < 1:
        raise ValueError("a window needs at least one record")
    affected_rows = int(round(rows * affected_share))
    sites = np.concatenate(
        [
            np.full(affected_rows, AFFECTED_SITE),
            np.asarray(CALM_SITES)[rng.integers(0, len(CALM_SITES), rows - affected_rows)],
        ]
    )
    rng.shuffle(sites)
    affected = sites == AFFECTED_SITE

    prevalence = np.full(rows, champion.population.prevalence)
    if scenario.prevalence is not None:
        prevalence[affected] = scenario.prevalence
    truth = rng.random(rows) < prevalence
    values = champion.population.features(truth, rng)

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
    probability = probability_malignant(champion.model, current)
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
    at_site = current[SITE].to_numpy() == AFFECTED_SITE
    site_truth, site_flagged = truth[kept][at_site], (probability >= champion.threshold)[at_site]
    facts = {
        "scored": int(kept.sum()),
        "affected_sensitivity": float(site_flagged[site_truth].mean()) if site_truth.any() else None,
        "affected_flagged_rate": float(site_flagged.mean()) if len(site_flagged) else None,
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

    # The affected site only, without feedback labels or baseline refusals.
    alone = dict(affected_share=1.0, feedback_share=0.0, baseline_refusal=0.0)
    changed, calm = (generate_window(name, rows, champion, rng, **alone) for name in (scenario, "calm"))
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
