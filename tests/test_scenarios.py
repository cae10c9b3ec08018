"""The monitoring-power benchmark's scenario generator at small sizes, and feature importance."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ks_2samp

from medops.core.settings import Settings
from monitoring.drift import ENCOUNTER_HASH, PROBABILITY
from monitoring.scenarios import (
    AFFECTED_SITE,
    SCENARIOS,
    WRONG_UNIT_FEATURES,
    Population,
    fit_champion,
    generate_window,
    reference_split,
    scenario_effect,
    shifted_features,
)
from pipelines.data import seed_frame
from pipelines.metrics import LINEAR_IMPORTANCE, PERMUTATION_IMPORTANCE, feature_importance, normalised
from pipelines.schema import FEATURES, LABEL, POSITIVE, SITE


@pytest.fixture(scope="module")
def champion():
    return fit_champion(Settings())


def test_champion_is_fitted_as_training_fits_it_on_rows_drawn_from_the_population(champion):
    train, holdout = reference_split(seed_frame(), Settings())
    assert len(champion.reference) == len(train) == 455 and len(champion.holdout) == len(holdout) == 114
    for drawn, real in ((champion.reference, train), (champion.holdout, holdout)):
        assert (drawn[LABEL] == POSITIVE).sum() == (real[LABEL] == POSITIVE).sum()  # the split's class counts
    seed_rows = {tuple(row) for row in seed_frame()[list(FEATURES)].round(6).to_numpy()}
    assert not seed_rows & {tuple(row) for row in champion.reference[list(FEATURES)].round(6).to_numpy()}
    assert 0 < champion.threshold <= 0.5  # the operating point chosen for sensitivity
    assert champion.reference[PROBABILITY].between(0, 1).all()
    assert sum(champion.importance.values()) == pytest.approx(1.0)
    assert champion.estimator.threshold == champion.threshold


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_scenario_generates_a_prediction_log_window(champion, name):
    window = generate_window(name, 80, champion, np.random.default_rng(0))
    current = window.current
    assert {*FEATURES, SITE, PROBABILITY, "label", ENCOUNTER_HASH} <= set(current.columns)
    assert current[ENCOUNTER_HASH].is_unique
    assert set(window.feedback[ENCOUNTER_HASH]) <= set(current[ENCOUNTER_HASH])
    assert sum(t.requests for t in window.traffic.values()) == 80
    assert sum(t.scored for t in window.traffic.values()) == len(current) == window.truth["scored"]
    assert (current[SITE] == AFFECTED_SITE).sum() == window.traffic[AFFECTED_SITE].scored


def test_site_layout_and_feedback_share(champion):
    window = generate_window("calm", 400, champion, np.random.default_rng(1), baseline_refusal=0.0)
    sites = window.current[SITE].value_counts()
    assert sites[AFFECTED_SITE] == 200 and set(sites.index) == {AFFECTED_SITE, "site-a", "site-b", "site-c"}
    assert 0.5 < len(window.feedback) / len(window.current) < 0.7
    assert all(t.refused == 0 for t in window.traffic.values())


def test_shifts_move_the_named_features_at_the_affected_site_only(champion):
    top = shifted_features(SCENARIOS["important_x1.5"], champion.importance)
    ranked = sorted(champion.importance, key=lambda n: -champion.importance[n])
    assert top == ranked[:3]
    ignored = shifted_features(SCENARIOS["ignored_x1.25"], champion.importance)
    assert ignored and sum(champion.importance[n] for n in ignored) <= 0.05
    assert not set(ignored) & set(ranked[:10])

    calm = generate_window("calm", 600, champion, np.random.default_rng(2), baseline_refusal=0.0)
    shifted = generate_window("important_x1.5", 600, champion, np.random.default_rng(2), baseline_refusal=0.0)
    at = shifted.current[SITE] == AFFECTED_SITE
    ratio = shifted.current.loc[at, top].mean() / calm.current.loc[calm.current[SITE] == AFFECTED_SITE, top].mean()
    assert ratio.between(1.35, 1.65).all()
    others = shifted.current.loc[~at, top].mean() / calm.current.loc[calm.current[SITE] != AFFECTED_SITE, top].mean()
    assert others.between(0.9, 1.1).all()


def test_wrong_unit_records_are_refused_naming_the_fields(champion):
    window = generate_window("wrong_unit", 200, champion, np.random.default_rng(3), baseline_refusal=0.0)
    site = window.traffic[AFFECTED_SITE]
    assert 30 < site.refused < 70  # half of its 100 records
    assert set(site.by_field) == set(WRONG_UNIT_FEATURES)
    assert all(reasons == {"out_of_range": site.refused} for reasons in site.by_field.values())
    assert all(window.traffic[s].refused == 0 for s in ("site-a", "site-b", "site-c"))


def test_prevalence_and_concept_shift_change_the_truth(champion):
    rng = np.random.default_rng(4)
    prevalence = generate_window("prevalence_80", 600, champion, rng, feedback_share=1.0)
    labels = prevalence.feedback.merge(prevalence.current[[ENCOUNTER_HASH, SITE]], on=ENCOUNTER_HASH)
    at_site = labels[labels[SITE] == AFFECTED_SITE]
    assert 0.72 < (at_site[LABEL] == POSITIVE).mean() < 0.88
    effect = scenario_effect("concept_shift", champion, rng, rows=3000)
    calm = scenario_effect("calm", champion, rng, rows=3000)
    assert effect["sensitivity"] < 0.85 < calm["sensitivity"]
    assert effect["prediction_shift"] < 0.05  # invisible in the scores


def test_windows_are_fresh_rows_the_champion_never_saw(champion):
    window = generate_window("calm", 300, champion, np.random.default_rng(5), baseline_refusal=0.0)
    seen = {tuple(row) for row in champion.reference[list(FEATURES)].round(6).to_numpy()}
    seen |= {tuple(row) for row in champion.holdout[list(FEATURES)].round(6).to_numpy()}
    drawn = [tuple(row) for row in window.current[list(FEATURES)].round(6).to_numpy()]
    assert len(set(drawn)) == len(drawn) and not seen & set(drawn)
    again = generate_window("calm", 300, champion, np.random.default_rng(6), baseline_refusal=0.0)
    assert not set(drawn) & {tuple(row) for row in again.current[list(FEATURES)].round(6).to_numpy()}


def test_population_keeps_each_class_marginals_and_range():
    frame = seed_frame()
    population = Population.of(frame)
    assert population.prevalence == pytest.approx((frame[LABEL] == POSITIVE).mean())
    rng = np.random.default_rng(7)
    for label in (True, False):
        real = frame[(frame[LABEL] == POSITIVE) == label][list(FEATURES)].to_numpy()
        drawn = population.features(np.full(len(real), label), rng)
        pvalues = [ks_2samp(drawn[:, i], real[:, i]).pvalue for i in range(len(FEATURES))]
        assert min(pvalues) > 0.01, pvalues  # a K-S test at the seed's own size does not reject
        assert (drawn >= real.min(axis=0)).all() and (drawn <= real.max(axis=0)).all()
    # the dependence survives: radius and perimeter stay nearly one quantity, per class
    drawn = population.draw((500, 500), rng)
    assert drawn["mean_radius"].corr(drawn["mean_perimeter"], method="spearman") > 0.95
    assert drawn[LABEL].value_counts().to_dict() == {POSITIVE: 500, "benign": 500}


def _faithfulness(settings: Settings, rows: int, seed: int = 1) -> dict:
    """How close generated rows are to the seed's real ones (the figures in monitoring/scenarios.py's
    docstring): per class and feature a K-S test of generated vs seed rows, and two champions (one
    fitted on the real training split, the scenarios' one fitted on generated rows) scored on real
    and on generated rows."""
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    from pipelines.metrics import probability_malignant
    from pipelines.train import choose_threshold, fit_final, search_best

    frame = seed_frame()
    population = Population.of(frame)
    rng = np.random.default_rng(seed)
    rejected = 0
    for label in (True, False):
        real = frame[(frame[LABEL] == POSITIVE) == label][list(FEATURES)].to_numpy()
        drawn = population.features(np.full(len(real), label), rng)
        rejected += sum(ks_2samp(drawn[:, i], real[:, i]).pvalue < 0.05 for i in range(len(FEATURES)))

    def figures(model, threshold: float, cases) -> dict:
        score = probability_malignant(model, cases[list(FEATURES)])
        truth, flagged = (cases[LABEL] == POSITIVE).to_numpy(), score >= threshold
        return {
            "auc": float(roc_auc_score(truth, score)),
            "sensitivity": float(flagged[truth].mean()),
            "specificity": float((~flagged[~truth]).mean()),
            "flagged_rate": float(flagged.mean()),
            "scores": score,
        }

    def compare(model, threshold: float, real) -> dict:
        count = int(round(rows * population.prevalence))
        on_real = figures(model, threshold, real)
        on_drawn = figures(model, threshold, population.draw((count, rows - count), rng))
        distance = float(ks_2samp(on_real.pop("scores"), on_drawn.pop("scores")).statistic)
        return {"real": on_real, "generated": on_drawn, "score_ks_distance": distance}

    train, holdout = reference_split(frame, settings)
    with threadpool_limits(limits=1):
        _, estimator, _ = search_best(train, ["logistic_regression"], settings)
        threshold = choose_threshold(estimator, train, settings.sensitivity_target, settings)
        real_model = fit_final(estimator, threshold, train)
    champion = fit_champion(settings, frame)
    return {
        "rejected_at_5pct": rejected,
        "real_champion": compare(real_model, threshold, holdout),
        "generated_champion": compare(champion.model, champion.threshold, frame),
    }


def test_generated_rows_score_like_real_rows():
    found = _faithfulness(Settings(), rows=5_000)
    assert found["rejected_at_5pct"] <= 3  # of 60 K-S tests (30 features, two classes)
    for champion in ("real_champion", "generated_champion"):
        real, generated = found[champion]["real"], found[champion]["generated"]
        assert found[champion]["score_ks_distance"] < 0.1
        for name in ("auc", "sensitivity", "specificity", "flagged_rate"):
            assert abs(real[name] - generated[name]) < 0.04, (champion, name, real, generated)


def test_bad_window_size_is_refused(champion):
    with pytest.raises(ValueError, match="at least one record"):
        generate_window("calm", 0, champion, np.random.default_rng(0))


def test_the_scenarios_weigh_features_by_the_importance_training_stores(champion):
    stored = feature_importance(champion.model, champion.reference, champion.holdout, seed=Settings().seed)
    assert stored.method == LINEAR_IMPORTANCE
    assert champion.importance == pytest.approx(stored.importance, rel=1e-9)


def test_other_models_get_permutation_importance_on_held_out_rows():
    from sklearn.ensemble import HistGradientBoostingClassifier

    frame = seed_frame()
    train, holdout = reference_split(frame, Settings())
    model = HistGradientBoostingClassifier(random_state=0).fit(train[list(FEATURES)], train[LABEL])
    found = feature_importance(model, train, holdout, seed=0)
    assert found.method == PERMUTATION_IMPORTANCE
    assert sum(found.importance.values()) == pytest.approx(1.0) and min(found.importance.values()) >= 0
    top = max(found.importance, key=found.importance.get)
    assert top.startswith(("worst_", "mean_concave")), found


def test_normalised_weights():
    assert normalised({"a": 2.0, "b": -1.0, "c": 2.0}) == {"a": 0.5, "b": 0.0, "c": 0.5}
    assert normalised({"a": 0.0, "b": 0.0}) == {"a": 0.5, "b": 0.5}
    with pytest.raises(ValueError, match="finite"):
        normalised({"a": float("nan")})
    with pytest.raises(ValueError, match="no feature"):
        normalised({})
