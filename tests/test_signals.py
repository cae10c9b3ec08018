"""Each monitoring signal on small frames: calm gives nothing, a shift fires with the right figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.proportion import proportion_confint

from medops.core.settings import Settings
from monitoring.drift import ColumnDrift
from monitoring.estimation import PerformanceEstimate
from monitoring.scenarios import AFFECTED_SITE, SCENARIOS, fit_champion, generate_window, shifted_features
from monitoring.signals import (
    WINDOW,
    Severity,
    SiteTraffic,
    compute_signals,
    estimated_performance_signal,
    feature_drift_signals,
    prediction_drift_signal,
    realized_performance_signal,
    refusal_signals,
)
from pipelines.schema import FEATURES, SITE


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(drift_min_rows=100)


@pytest.fixture(scope="module")
def champion(settings):
    return fit_champion(settings)


def _signals(window, champion, settings, **extra):
    return compute_signals(
        window.current,
        champion.reference,
        settings,
        importance=champion.importance,
        estimator=champion.estimator,
        feedback=window.feedback,
        traffic=window.traffic,
        **extra,
    )


def _all_fired(found):
    return [signal for scope in [found.window, *found.sites.values()] for signal in scope.fired]


# Whole windows ---------------------------------------------------------------------------------------
def test_calm_window_fires_nothing(champion, settings):
    found = _signals(generate_window("calm", 400, champion, np.random.default_rng(1)), champion, settings)
    assert found.window.tested and _all_fired(found) == []
    names = {signal.name for signal in found.window.signals}
    assert {"prediction_drift", "important_feature_drift", "top_feature_drift", "column_share_drift"} <= names
    assert {"estimated_performance", "realized_performance"} <= names
    assert found.sites[AFFECTED_SITE].tested and found.sites[AFFECTED_SITE].n_rows > 150


def test_shift_of_important_features_fires_with_the_shifted_features_named(champion, settings):
    window = generate_window("important_x1.5", 400, champion, np.random.default_rng(2))
    found = _signals(window, champion, settings)
    site = found.sites[AFFECTED_SITE]
    prediction, top = site.get("prediction_drift"), site.get("top_feature_drift")
    assert prediction.fired and prediction.severity == Severity.CRITICAL
    assert prediction.figures["score"] <= settings.monitor_prediction_drift_p_value
    assert top.fired and top.severity == Severity.CRITICAL
    shifted = set(shifted_features(SCENARIOS["important_x1.5"], champion.importance))
    named = {entry["feature"] for entry in top.figures["strongly_drifted"]}
    assert named and named <= shifted
    for entry in top.figures["strongly_drifted"]:
        assert entry["score"] <= settings.monitor_strong_drift_p_value
        assert entry["distance"] >= settings.monitor_material_shift
        assert entry["rank"] <= settings.monitor_top_features
    # The calm sites stay silent: the shift is pinned on the site that has it.
    for name in ("site-a", "site-b", "site-c"):
        assert not [s for s in found.sites[name].fired if s.points_to == "drift"]


def test_small_shifted_site_among_large_calm_ones_is_found(champion, settings):
    rng = np.random.default_rng(3)
    calm = generate_window("calm", 1200, champion, rng, affected_share=0.0).current
    small = generate_window("important_x1.5", 60, champion, rng, affected_share=1.0).current
    small = small.assign(**{SITE: "site-small", "encounter_hash": [f"s{i}" for i in range(len(small))]})
    current = pd.concat([calm, small], ignore_index=True)
    found = compute_signals(current, champion.reference, settings, importance=champion.importance)
    assert found.sites["site-small"].n_rows == 60 and found.sites["site-small"].tested
    assert any(s.name in ("prediction_drift", "top_feature_drift") for s in found.sites["site-small"].fired)
    # Diluted in 1,260 rows the same shift does not show window-wide: only the per-site view finds it.
    assert not [s for s in found.window.fired if s.points_to == "drift"]


def test_sites_below_the_minimum_get_no_drift_tests(champion, settings):
    rng = np.random.default_rng(4)
    window = generate_window("calm", 300, champion, rng)
    tiny = window.current.assign(**{SITE: np.where(np.arange(len(window.current)) < 20, "site-tiny", "site-big")})
    found = compute_signals(tiny, champion.reference, settings, importance=champion.importance)
    assert not found.sites["site-tiny"].tested and found.sites["site-tiny"].signals == ()
    assert found.sites["site-big"].tested


def test_importance_must_name_known_features(champion, settings):
    window = generate_window("calm", 200, champion, np.random.default_rng(5))
    with pytest.raises(ValueError, match="patient_name"):
        compute_signals(window.current, champion.reference, settings, importance={"patient_name": 1.0})


# One signal at a time ----------------------------------------------------------------------------------
def test_prediction_drift_signal(settings):
    calm = prediction_drift_signal(ColumnDrift("probability_malignant", "ks", 0.2, 0.05, False), 0.03, WINDOW, settings)
    shifted = prediction_drift_signal(
        ColumnDrift("probability_malignant", "ks", 1e-9, 0.05, True), 0.4, "site-x", settings
    )
    assert not calm.fired and calm.severity is None
    assert shifted.fired and shifted.severity == Severity.CRITICAL and shifted.points_to == "drift"
    assert shifted.figures["score"] == 1e-9 and shifted.scope == "site-x"
    # Significant for Evidently (p <= 0.05) is not enough for medops' stricter threshold.
    borderline = prediction_drift_signal(
        ColumnDrift("probability_malignant", "ks", 0.01, 0.05, True), 0.1, WINDOW, settings
    )
    assert not borderline.fired


def test_importance_weighted_share_counts_what_the_model_relies_on(settings):
    importance = dict.fromkeys(FEATURES, 0.2 / 25) | {name: 0.16 for name in FEATURES[:5]}

    def column(name: str, p: float) -> ColumnDrift:
        return ColumnDrift(name, "ks", p, 0.05, p <= 0.05)

    # Ten ignored features drift a lot: a third of the columns, a twentieth of the weight.
    ignored = {name: column(name, 1e-12 if name in FEATURES[10:20] else 0.5) for name in FEATURES}
    far = dict.fromkeys(FEATURES, 1.0)
    weighted, top, share = feature_drift_signals(ignored, far, importance, WINDOW, settings)
    assert not weighted.fired and weighted.figures["weighted_share"] == pytest.approx(10 * 0.2 / 25, abs=1e-4)
    assert not top.fired
    assert (
        share.fired and share.severity == Severity.WARNING and share.figures["share"] == pytest.approx(1 / 3, abs=1e-3)
    )

    # Two of the five most important drift strongly: a third of the weight, and the top signal.
    important = {name: column(name, 1e-12 if name in FEATURES[:2] else 0.5) for name in FEATURES}
    weighted, top, share = feature_drift_signals(important, far, importance, WINDOW, settings)
    assert weighted.figures["weighted_share"] == pytest.approx(0.32, abs=1e-4)
    assert weighted.fired == (0.32 >= settings.monitor_importance_share)
    assert top.fired and {e["feature"] for e in top.figures["strongly_drifted"]} == set(FEATURES[:2])
    assert not share.fired

    # The same p-values but shifts too small to matter: nothing counts.
    near = dict.fromkeys(FEATURES, settings.monitor_material_shift / 2)
    weighted, top, share = feature_drift_signals(important, near, importance, WINDOW, settings)
    assert weighted.figures["weighted_share"] == 0 and not top.fired and not share.fired


def test_estimated_performance_signal(settings):
    gate = settings.min_sensitivity

    def estimate(sensitivity: float, error: float, expected: float = 40.0) -> PerformanceEstimate:
        return PerformanceEstimate(200, expected, 80, sensitivity, error, 0.95, 0.01, 0.5, 0.05)

    assert not estimated_performance_signal(estimate(0.975, 0.01), WINDOW, settings).fired
    warning = estimated_performance_signal(estimate(gate - 0.01, 0.03), WINDOW, settings)
    assert warning.fired and warning.severity == Severity.WARNING and warning.points_to == "performance_drop"
    critical = estimated_performance_signal(estimate(0.80, 0.03), WINDOW, settings)
    assert critical.fired and critical.severity == Severity.CRITICAL
    assert critical.figures["sensitivity"] == 0.80 and critical.figures["gate_min_sensitivity"] == gate
    few = estimated_performance_signal(estimate(0.5, 0.2, expected=2.0), WINDOW, settings)
    assert not few.fired and "too few" in few.text


def _labelled(
    malignant: int, missed: int, benign: int = 40, false_alarms: int = 2, site: str = "site-a"
) -> pd.DataFrame:
    truth = ["malignant"] * malignant + ["benign"] * benign
    served = ["malignant"] * (malignant - missed) + ["benign"] * missed
    served += ["malignant"] * false_alarms + ["benign"] * (benign - false_alarms)
    return pd.DataFrame({"diagnosis": truth, "label": served, "probability_malignant": 0.5, SITE: site})


def test_realized_performance_signal_uses_wilson_intervals(settings):
    dropped = realized_performance_signal(_labelled(40, 12), WINDOW, settings)
    assert dropped.fired and dropped.severity == Severity.CRITICAL
    assert (dropped.figures["tp"], dropped.figures["fn"]) == (28, 12)
    expected = proportion_confint(28, 40, method="wilson")
    assert dropped.figures["sensitivity_interval"] == pytest.approx(expected)
    assert dropped.figures["specificity"] == pytest.approx(38 / 40)

    fine = realized_performance_signal(_labelled(40, 1), WINDOW, settings)
    assert not fine.fired and fine.figures["sensitivity"] == pytest.approx(39 / 40)
    # Below the gate as a point, not confidently: no alarm on a handful of cases.
    assert not realized_performance_signal(
        _labelled(settings.monitor_feedback_min_malignant + 2, 2), WINDOW, settings
    ).fired
    few = realized_performance_signal(_labelled(settings.monitor_feedback_min_malignant - 1, 5), WINDOW, settings)
    assert not few.fired and "not judged" in few.text


def test_realized_performance_fires_only_when_the_monitor_level_upper_bound_is_below_the_gate(settings):
    # 90 of 100 found: the 95 % interval's upper end (0.945) is under the gate, the 99.9 % one is not.
    borderline = realized_performance_signal(_labelled(100, 10), WINDOW, settings)
    assert borderline.figures["sensitivity_interval"][1] < settings.min_sensitivity
    assert settings.monitor_realized_confidence == 0.999
    assert borderline.figures["sensitivity_upper_bound"] >= settings.min_sensitivity and not borderline.fired
    assert "99.9 % upper bound" in borderline.text
    lenient = settings.model_copy(update={"monitor_realized_confidence": 0.95})
    assert realized_performance_signal(_labelled(100, 10), WINDOW, lenient).fired
    assert realized_performance_signal(_labelled(100, 20), WINDOW, settings).fired  # 0.80: confidently below


def test_refusal_jump_names_the_site_and_fields(settings):
    traffic = [
        SiteTraffic("site-a", 495, 5, {"mean_area": {"missing": 5}}),
        SiteTraffic("site-b", 280, 120, {"mean_radius": {"out_of_range": 120}, "worst_radius": {"out_of_range": 118}}),
        {"site": "site-c", "scored": 20, "refused": 10, "by_field": {"mean_texture": {"missing": 10}}},
    ]
    found = refusal_signals(traffic, settings)
    assert not found["site-a"].fired
    b = found["site-b"]
    assert b.fired and b.points_to == "data_quality" and b.severity == Severity.CRITICAL
    assert b.figures["refusal_rate"] == pytest.approx(0.3) and list(b.figures["fields"])[:2] == [
        "mean_radius",
        "worst_radius",
    ]
    assert "mean_radius (120)" in b.text and b.figures["baseline_from"] == "the other sites"
    assert b.figures["baseline_rate"] == pytest.approx(15 / 530, abs=1e-4) and b.figures["baseline_ceiling"] > 15 / 530
    assert not found["site-c"].fired and "not judged" in found["site-c"].text  # 30 records only

    # Against its own earlier traffic a site with a steady 8 % refusal rate is no incident.
    steady = refusal_signals(
        [SiteTraffic("site-z", 920, 80)], settings, baseline={"site-z": SiteTraffic("site-z", 460, 40)}
    )
    assert not steady["site-z"].fired and steady["site-z"].figures["baseline_from"] == "its own earlier traffic"


def test_traffic_input_is_checked():
    with pytest.raises(ValueError, match="site-q"):
        SiteTraffic.of({"scored": 3}, "site-q")
    with pytest.raises(ValueError, match="'site'"):
        refusal_signals([{"scored": 100, "refused": 0}], Settings())
    with pytest.raises(ValueError, match="negative"):
        SiteTraffic("site-q", -1, 0)


def test_refusals_and_labels_reach_the_signals_of_a_window(champion, settings):
    window = generate_window("wrong_unit", 300, champion, np.random.default_rng(6))
    found = _signals(window, champion, settings)
    refusal = found.sites[AFFECTED_SITE].get("refusal_rate")
    assert refusal.fired
    assert set(refusal.figures["fields"]) >= {"mean_radius", "worst_radius", "mean_perimeter", "worst_perimeter"}

    concept = generate_window("concept_shift", 600, champion, np.random.default_rng(7))
    found = _signals(concept, champion, settings)
    realized = found.sites[AFFECTED_SITE].get("realized_performance")
    assert realized.fired and realized.figures["sensitivity"] < settings.min_sensitivity
    # The labels are the only witness: scores and features did not move at that site.
    assert not [s for s in found.sites[AFFECTED_SITE].fired if s.name == "prediction_drift"]
    assert not found.sites[AFFECTED_SITE].get("estimated_performance").fired


def test_a_site_called_window_and_a_reference_without_scores(champion, settings):
    window = generate_window("calm", 300, champion, np.random.default_rng(8))
    current = window.current.assign(**{SITE: np.where(window.current[SITE] == AFFECTED_SITE, "window", "site-a")})
    traffic = {"window": SiteTraffic("window", 10, 90, {"mean_area": {"out_of_range": 90}})}
    reference = champion.reference.drop(columns=["probability_malignant"])
    found = compute_signals(
        current, reference, settings, importance=champion.importance, estimator=champion.estimator, traffic=traffic
    )
    # The site keeps its own signals; the window's stay the window's.
    assert found.sites["window"].get("refusal_rate").fired and found.window.get("refusal_rate") is None
    # Without reference scores there is no prediction drift, but CBPE needs only the window's scores.
    assert (
        not found.window.get("prediction_drift").fired
        and "no champion scores" in found.window.get("prediction_drift").text
    )
    assert found.window.get("estimated_performance").figures["sensitivity"] is not None


def test_realized_performance_is_judged_on_the_latest_labels_of_each_site_and_overall(champion, settings):
    latest = settings.model_copy(update={"monitor_label_window": 80})
    window = generate_window("calm", 300, champion, np.random.default_rng(9))
    # Oldest first: site-a's early labels miss a third of its cancers, its latest 80 miss one.
    labelled = pd.concat([_labelled(60, 20), _labelled(40, 1), _labelled(40, 0, site=AFFECTED_SITE)])
    found = _signals(window, champion, latest, labelled=labelled)
    site = found.sites["site-a"].get("realized_performance")
    assert site.figures["labelled"] == 80 and site.figures["fn"] == 1 and not site.fired
    overall = found.window.get("realized_performance")
    assert overall.figures["labelled"] == 80 and overall.figures["fn"] == 0  # site-d's 80 came last
    # The same labels in the other order: the latest are the bad ones, and they fire.
    found = _signals(window, champion, latest, labelled=pd.concat([_labelled(40, 1), _labelled(60, 20)]))
    site = found.sites["site-a"].get("realized_performance")
    assert site.fired and site.figures["labelled"] == 80 and site.figures["fn"] == 20


def test_top_feature_mean_shift_fires_on_a_joint_shift_and_stays_quiet_on_calm(champion, settings):
    calm = _signals(generate_window("calm", 1000, champion, np.random.default_rng(10)), champion, settings)
    for scope in (calm.window, calm.sites[AFFECTED_SITE]):
        assert not scope.get("top_feature_mean_shift").fired
    moved = generate_window("important_x1.1", 1000, champion, np.random.default_rng(11))
    shift = _signals(moved, champion, settings).sites[AFFECTED_SITE].get("top_feature_mean_shift")
    assert shift.fired and shift.severity == Severity.CRITICAL
    assert shift.figures["p_value"] <= settings.monitor_top_shift_p_value
    assert shift.figures["distance"] >= settings.monitor_top_shift_distance
    top = sorted(champion.importance, key=lambda name: -champion.importance[name])[: settings.monitor_top_features]
    assert list(shift.figures["shift_sd"]) == top
    before = calm.sites[AFFECTED_SITE].get("top_feature_mean_shift").figures["shift_sd"]
    for name in shifted_features(SCENARIOS["important_x1.1"], champion.importance):
        assert shift.figures["shift_sd"][name] > before[name]  # scaled by 1.1: their means moved up
