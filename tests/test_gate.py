"""The promotion gate: lower bounds, non-inferiority on the same rows, per-site evidence, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medops.core.settings import Settings
from pipelines.gate import GateDecision, ModelScores, decide
from pipelines.protocol import load_protocol


@pytest.fixture(scope="module")
def protocol():
    return load_protocol()


def _model(rng: np.random.Generator, malignant: int, benign: int, missed: int, false_alarms: int) -> ModelScores:
    """A model's scores on one group of rows with exactly ``missed`` cancers and ``false_alarms`` at 0.5.

    Missed cancers score 0.30-0.45, inside the benign rows' range, so AUC falls below 1 as cancers
    are missed; false alarms score 0.50-0.65, above the other benign rows but below found cancers,
    as for a model whose threshold was set low to find every cancer.
    """
    truth = np.repeat([True, False], [malignant, benign])
    probability = np.concatenate(
        [
            rng.uniform(0.30, 0.45, missed),
            rng.uniform(0.65, 1.00, malignant - missed),
            rng.uniform(0.50, 0.65, false_alarms),
            rng.uniform(0.00, 0.45, benign - false_alarms),
        ]
    )
    return ModelScores(truth, probability, probability >= 0.5)


def _hold_out(
    spec: dict[str, tuple[int, int, int, int, int, int]], seed: int = 0
) -> tuple[ModelScores, ModelScores, np.ndarray]:
    """Candidate and champion on the same rows; per site (malignant, benign, cand. missed, cand. false
    alarms, champ. missed, champ. false alarms)."""
    rng = np.random.default_rng(seed)
    candidate, champion, sites = [], [], []
    for site, (malignant, benign, c_missed, c_fa, h_missed, h_fa) in spec.items():
        candidate.append(_model(rng, malignant, benign, c_missed, c_fa))
        champion.append(_model(rng, malignant, benign, h_missed, h_fa))
        sites += [site] * (malignant + benign)

    def joined(models: list[ModelScores]) -> ModelScores:
        return ModelScores(*(np.concatenate(parts) for parts in zip(*models, strict=True)))

    return joined(candidate), joined(champion), np.array(sites)


def test_the_seed_champion_passes_the_protocol_honestly(protocol, tmp_path: Path):
    """The champion as pipelines/train.py trains it, judged on the protocol's hash hold-out.

    The protocol's comments give these figures (sensitivity 49/49, lower 0.927; specificity 55/62,
    lower 0.785; AUC lower 0.9988); the floors sit a stated margin below, so this must pass
    without any threshold lowered, and each lower bound must clear its floor by that margin.
    """
    from threadpoolctl import threadpool_limits

    from pipelines.data import seed_frame
    from pipelines.holdout import split_by_row_key
    from pipelines.metrics import evaluate_model
    from pipelines.schema import SITE
    from pipelines.train import choose_threshold, fit_final, search_best

    settings = Settings(home=tmp_path)
    train, holdout = split_by_row_key(seed_frame(), protocol.automatic.holdout_share)
    with threadpool_limits(limits=1):
        _, estimator, _ = search_best(train, ["logistic_regression"], settings)
        threshold = choose_threshold(estimator, train, settings.sensitivity_target, settings)
        evaluation = evaluate_model(fit_final(estimator, threshold, train), holdout)
    scores = ModelScores(evaluation.is_malignant, evaluation.probability_malignant, evaluation.predicted_malignant)
    decision = decide(scores, None, holdout[SITE].to_numpy(), protocol)

    assert decision.passed, decision.reasons
    assert decision.thresholds_below_protocol == []
    figures, floors = decision.overall.candidate, protocol.gate
    assert figures.sensitivity.lower >= floors.sensitivity_lower + 0.05
    assert figures.specificity.lower >= floors.specificity_lower + 0.05
    assert figures.roc_auc.lower >= floors.roc_auc_lower + 0.02
    assert set(decision.sites) == {"site-a", "site-b", "site-c"}
    for site in decision.sites.values():
        assert site.status == "passed"
        assert site.candidate.sensitivity.lower >= floors.site_sensitivity_lower + 0.05
        assert site.candidate.specificity.lower >= floors.site_specificity_lower + 0.05


def test_a_candidate_passing_on_point_estimates_but_not_on_the_lower_bound_is_refused(protocol):
    """19 of 20 cancers found: sensitivity 0.95 meets the old point rule (>= 0.95), but with 20
    malignant rows the Wilson lower bound is 0.764, below the protocol's 0.85. The missed cancer
    scores 0.48, just under the threshold and above every benign row but the two false alarms, so
    ROC AUC stays near 1 and sensitivity's lower bound alone refuses the candidate."""
    rng = np.random.default_rng(0)
    truth = np.repeat([True, False], [20, 60])
    probability = np.concatenate(
        [[0.48], rng.uniform(0.65, 1.0, 19), rng.uniform(0.5, 0.65, 2), rng.uniform(0.0, 0.45, 58)]
    )
    candidate = ModelScores(truth, probability, probability >= 0.5)
    champion = ModelScores(truth, np.where(truth, 0.9, 0.1), truth)
    sites = np.array(["site-a"] * 80)
    decision = decide(candidate, champion, sites, protocol, champion_version="3")

    old_min_sensitivity, old_min_roc_auc = 0.95, 0.97  # the former point-estimate gate
    assert decision.overall.candidate.sensitivity.value >= old_min_sensitivity
    assert decision.overall.candidate.roc_auc.value >= old_min_roc_auc
    assert not decision.passed
    assert decision.overall.candidate.sensitivity.lower == pytest.approx(0.7639, abs=1e-4)
    assert decision.reasons[0].startswith("refuse")
    assert any(
        "overall: sensitivity 0.950 [0.764, 0.991] (19/20), lower bound below floor 0.85" in r for r in decision.reasons
    )
    failed = [check for check in decision.checks if check.status == "failed"]
    assert [(c.scope, c.rule) for c in failed] == [("overall", "sensitivity_lower")]


def test_a_small_site_is_reported_as_not_enough_evidence_never_passed_silently(protocol):
    candidate, champion, sites = _hold_out(
        {"site-a": (60, 80, 0, 4, 0, 4), "site-b": (50, 70, 0, 3, 0, 3), "site-small": (4, 12, 0, 0, 0, 0)}
    )
    decision = decide(candidate, champion, sites, protocol)

    assert decision.passed, decision.reasons
    small = decision.sites["site-small"]
    assert small.status == "not_enough_evidence"
    assert small.candidate.sensitivity.value == 1.0  # measured and shown, just not judged
    rules = {(c.rule, c.status) for c in decision.checks if c.scope == "site-small"}
    assert rules == {("sensitivity_lower", "not_enough_evidence"), ("specificity_lower", "passed")}
    line = next(r for r in decision.reasons if r.startswith("site-small:"))
    assert "not enough evidence" in line and "(4 malignant hold-out rows, 10 needed)" in line
    assert decision.sites["site-a"].status == "passed"


def test_a_site_with_enough_evidence_must_meet_its_own_floor(protocol):
    """Overall figures pass, but one site misses 4 of 12 cancers (lower bound 0.39 < 0.65): refused."""
    candidate, champion, sites = _hold_out(
        {"site-a": (100, 120, 0, 5, 0, 5), "site-b": (80, 100, 0, 4, 0, 4), "site-c": (12, 20, 4, 0, 0, 0)}
    )
    decision = decide(candidate, champion, sites, protocol)
    assert decision.overall.candidate.sensitivity.lower >= protocol.gate.sensitivity_lower
    assert not decision.passed
    assert decision.sites["site-c"].status == "failed"
    assert any(r.startswith("site-c: FAILS its floors") for r in decision.reasons)


def test_a_candidate_that_may_be_worse_than_the_champion_is_refused(protocol):
    """Same rows; the candidate ranks many more benign rows above cancers than the champion does."""
    rng = np.random.default_rng(4)
    truth = np.repeat([True, False], [150, 200])
    champion = np.where(truth, rng.uniform(0.5, 1.0, 350), rng.uniform(0.0, 0.5, 350))
    candidate = np.where(truth, rng.normal(0.72, 0.15, 350), rng.normal(0.28, 0.15, 350)).clip(0, 1)
    decision = decide(
        (truth, candidate, candidate >= 0.5),
        (truth, champion, champion >= 0.5),
        np.array(["site-a"] * 350),
        protocol,
        thresholds=protocol.gate.model_copy(update={"roc_auc_lower": 0.9}),  # isolate non-inferiority
        champion_version="7",
    )
    difference = decision.overall.auc_difference
    assert difference.lower < -protocol.gate.non_inferiority_margin
    assert not decision.passed
    check = next(c for c in decision.checks if c.rule == "non_inferiority")
    assert check.status == "failed" and check.floor == -protocol.gate.non_inferiority_margin
    assert "refused, may be worse" in check.reason and f"champion {difference.champion:.4f}" in check.reason
    assert decision.champion_version == "7"
    assert any("roc_auc_lower 0.9 < protocol floor 0.97" in r for r in decision.thresholds_below_protocol)


def test_non_inferior_overall_and_clearly_better_at_a_drifted_site_passes_showing_why(protocol):
    """The case the loop exists for: the champion raises false alarms at a drifted site (specificity
    26/40 = 0.65, as the README's drift scenario saw 0.685); the retrained candidate does not."""
    candidate, champion, sites = _hold_out(
        {
            "site-a": (18, 20, 0, 2, 0, 2),
            "site-b": (14, 22, 0, 1, 0, 1),
            "site-c": (18, 21, 0, 3, 0, 3),
            "site-d": (25, 40, 0, 2, 0, 14),
        },
        seed=2,
    )
    decision = decide(candidate, champion, sites, protocol, champion_version="1")

    assert decision.passed, decision.reasons
    drifted = decision.sites["site-d"]
    assert drifted.champion.specificity.value == pytest.approx(26 / 40)
    assert drifted.candidate.specificity.value == pytest.approx(38 / 40)
    assert drifted.candidate.specificity.lower > drifted.champion.specificity.upper
    assert any(note.startswith("specificity candidate 0.950") and "clearly better" in note for note in drifted.notes)
    assert any(r.startswith("site-d: specificity candidate 0.950") for r in decision.reasons)
    assert decision.overall.auc_difference.lower >= -protocol.gate.non_inferiority_margin
    assert decision.metrics()["gate_site-d_specificity_lower"] == drifted.candidate.specificity.lower


def test_the_decision_round_trips_through_json(protocol):
    candidate, champion, sites = _hold_out({"site-a": (30, 40, 0, 3, 1, 2), "site-b": (3, 9, 0, 1, 0, 1)})
    decision = decide(candidate, champion, sites, protocol, champion_version="2")
    text = json.dumps(decision.to_dict(), allow_nan=False)
    again = GateDecision.model_validate(json.loads(text))
    assert again == decision
    assert again.protocol_sha256 == protocol.sha256 and again.protocol_version == protocol.version
    assert all(isinstance(v, float) for v in decision.metrics().values())


def test_without_a_champion_non_inferiority_is_said_not_applicable(protocol):
    candidate, _, sites = _hold_out({"site-a": (30, 40, 0, 2, 0, 2)})
    decision = decide(candidate, None, sites, protocol)
    assert decision.passed
    assert decision.overall.champion is None and decision.overall.auc_difference is None
    assert any("non-inferiority not applicable" in r for r in decision.reasons)


def test_a_hold_out_without_malignant_rows_is_refused(protocol):
    truth = np.zeros(30, dtype=bool)
    probability = np.linspace(0, 0.4, 30)
    decision = decide((truth, probability, probability > 0.5), None, np.array(["site-a"] * 30), protocol)
    assert not decision.passed
    assert any("no malignant hold-out rows" in r for r in decision.reasons)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c, h, s: (c, h._replace(is_malignant=~h.is_malignant), s), "champion: scored on other rows"),
        (lambda c, h, s: (c, h, s[:-1]), "sites: 69 site ids for 70"),
        (lambda c, h, s: (c._replace(probability=c.probability * 2), h, s), "candidate.probability"),
        (lambda c, h, s: (c._replace(predicted=c.predicted[:-1]), h, s), "different lengths"),
        (lambda c, h, s: ((c.is_malignant, c.probability), h, s), "expected \\(is_malignant, probability"),
    ],
)
def test_mismatched_inputs_are_refused_naming_the_problem(protocol, mutate, message: str):
    candidate, champion, sites = _hold_out({"site-a": (30, 40, 0, 2, 0, 2)})
    with pytest.raises(ValueError, match=message):
        decide(*mutate(candidate, champion, sites), protocol)


def test_the_readme_drift_scenario_replayed_offline(protocol, tmp_path: Path):
    """Seed champion vs a candidate retrained after 400 covariate-drifted cases from site-d arrived.

    Both are judged on the new version's hash hold-out, which still holds every seed hold-out row.
    The champion raises false alarms at site-d (27/54 benign rows right); the candidate is
    non-inferior overall and clearly better there, passes, and the decision shows site-d's figures.
    """
    import pandas as pd
    from threadpoolctl import threadpool_limits

    from medops.app.simulate import traffic
    from pipelines.data import seed_frame
    from pipelines.holdout import row_keys, split_by_row_key
    from pipelines.metrics import evaluate_model
    from pipelines.schema import DATA_COLUMNS, SITE
    from pipelines.train import choose_threshold, fit_final, search_best

    settings = Settings(home=tmp_path)

    def trained(frame):
        train, holdout = split_by_row_key(frame, protocol.automatic.holdout_share)
        with threadpool_limits(limits=1):
            _, estimator, _ = search_best(train, ["logistic_regression"], settings)
            threshold = choose_threshold(estimator, train, settings.sensitivity_target, settings)
            return fit_final(estimator, threshold, train), holdout

    v1 = seed_frame()
    v2 = pd.concat([v1, traffic("site-d", 400, "covariate", seed=1)[list(DATA_COLUMNS)]], ignore_index=True)
    champion_model, v1_holdout = trained(v1)
    candidate_model, holdout = trained(v2)
    assert set(row_keys(v1_holdout)) <= set(row_keys(holdout))

    def scores(model) -> ModelScores:
        evaluation = evaluate_model(model, holdout)
        return ModelScores(evaluation.is_malignant, evaluation.probability_malignant, evaluation.predicted_malignant)

    sites = holdout[SITE].to_numpy()
    decision = decide(scores(candidate_model), scores(champion_model), sites, protocol, champion_version="1")
    assert decision.passed, decision.reasons
    drifted = decision.sites["site-d"]
    assert drifted.status == "passed" and drifted.malignant >= protocol.gate.site_min_positives
    assert drifted.candidate.specificity.lower > drifted.champion.specificity.upper
    assert any(r.startswith("site-d: specificity candidate") and "clearly better" in r for r in decision.reasons)
    # the champion alone, judged by the same protocol on the same rows, fails at the drifted site
    alone = decide(scores(champion_model), None, sites, protocol)
    assert not alone.passed and alone.sites["site-d"].status == "failed"
