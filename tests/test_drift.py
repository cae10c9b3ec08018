"""The drift function on small in-memory frames built from the Wisconsin breast cancer data."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest

from monitoring.drift import (
    PROBABILITY,
    Verdict,
    _bin_right,
    _Column,
    _column_tests,
    classification_performance,
    detect_drift,
    label_predictions,
)
from pipelines.data import seed_frame
from pipelines.metrics import clinical_metrics
from pipelines.schema import FEATURES, LABEL, SITE

SIZE_FEATURES = tuple(name for name in FEATURES if any(size in name for size in ("radius", "perimeter", "area")))


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return seed_frame()


def window(reference: pd.DataFrame, rows: int, site: str, seed: int, scale: float = 1.0) -> pd.DataFrame:
    """A prediction-log-like window resampled from the reference, size features optionally scaled."""
    frame = reference.sample(rows, replace=True, random_state=seed).reset_index(drop=True)
    frame[list(SIZE_FEATURES)] *= scale
    frame[SITE] = site
    frame["encounter_hash"] = [f"{site}-{seed}-{i}" for i in range(rows)]
    return frame


def test_resample_of_reference_is_no_drift(reference, medops_home):
    found = detect_drift(window(reference, 400, "site-a", 1), reference, medops_home, report=False)
    assert found.verdict == Verdict.NO_DRIFT
    assert found.share < medops_home.drift_share_threshold
    assert found.n_current == 400 and found.n_reference == len(reference)
    assert set(found.columns) == set(FEATURES)
    assert all(column.test == "ks" for column in found.columns.values())  # Evidently's pick for <= 1000 rows


def test_shifted_copy_is_drift_and_names_the_size_features(reference, medops_home):
    found = detect_drift(window(reference, 400, "site-a", 2, scale=1.25), reference, medops_home, report=False)
    assert found.verdict == Verdict.DRIFT
    assert found.share >= medops_home.drift_share_threshold
    assert {"mean_radius", "worst_area", "mean_perimeter"} <= set(found.drifted_columns)
    assert not {"mean_smoothness", "mean_symmetry"} & set(found.drifted_columns)


def test_the_drift_report_leads_with_drifted_columns_and_names_the_versions(reference, medops_home):
    versions = {"model_version": "3", "data_version": "data-v2"}
    current = window(reference, 400, "site-a", 2, scale=1.25)
    found = detect_drift(current, reference, medops_home, metadata=versions)
    assert found.drift_snapshot.to_snapshot_model().metadata.items() >= versions.items()
    report = found.drift_snapshot.dict()
    leading = [metric["config"]["column"] for metric in report["metrics"][: len(found.drifted_columns)]]
    assert set(leading) == set(found.drifted_columns)
    assert [found.columns[name].score for name in leading] == sorted(found.columns[name].score for name in leading)
    assert report["metrics"][len(leading)]["metric_name"].startswith("DriftedColumnsCount")  # then the whole table


def test_below_min_rows_is_insufficient_data_and_tests_nothing(reference, medops_home):
    found = detect_drift(window(reference, 150, "site-a", 3, scale=2.0), reference, medops_home)
    assert medops_home.drift_min_rows == 200
    assert found.verdict == Verdict.INSUFFICIENT_DATA
    assert found.drifted_columns == () and found.columns == {}
    assert found.drift_snapshot is None
    assert found.per_site["site-a"].verdict == Verdict.INSUFFICIENT_DATA


def test_per_site_breakdown(reference, medops_home):
    current = pd.concat(
        [
            window(reference, 300, "site-shifted", 4, scale=1.25),
            window(reference, 700, "site-steady", 5),
            window(reference, 50, "site-small", 6, scale=1.25),
        ],
        ignore_index=True,
    ).sample(frac=1, random_state=0)  # sites interleaved, as they arrive
    found = detect_drift(current, reference, medops_home, report=False)
    shifted, steady, small = (found.per_site[s] for s in ("site-shifted", "site-steady", "site-small"))
    assert shifted.verdict == Verdict.DRIFT and shifted.n_rows == 300
    assert "mean_radius" in shifted.drifted_columns
    assert steady.verdict == Verdict.NO_DRIFT and steady.n_rows == 700
    assert small.verdict == Verdict.INSUFFICIENT_DATA and small.drifted_columns == ()
    assert found.drifted_sites == ("site-shifted",)


def test_per_site_verdict_equals_a_run_on_that_site_alone(reference, medops_home):
    current = pd.concat([window(reference, 250, "a", 7, scale=1.1), window(reference, 260, "b", 8)], ignore_index=True)
    found = detect_drift(current, reference, medops_home, report=False)
    alone = detect_drift(current[current[SITE] == "a"], reference, medops_home, report=False)
    assert found.per_site["a"].drifted_columns == alone.drifted_columns
    assert found.per_site["a"].verdict == alone.verdict


def test_fast_tests_equal_evidentlys_own(medops_home):
    """KS (exact and asymptotic), Wasserstein and the few-values fallback, with ties, NaN and infinities."""
    from evidently.legacy.calculations.stattests import get_stattest
    from evidently.legacy.core import ColumnType

    rng = np.random.default_rng(11)
    cases = [
        (rng.normal(size=455), rng.normal(0.05, 1, size=40_000)),  # KS, asymptotic p-value
        (rng.normal(size=455), rng.normal(size=900)),  # KS, exact p-value
        (np.round(rng.normal(size=300), 1), np.round(rng.normal(0.1, 1, size=45_000), 1)),  # ties
        (rng.lognormal(size=800), rng.lognormal(0.01, 1, size=60_000)),  # long tail: many values share cells
        (rng.normal(size=2_000), rng.normal(0.02, 1.1, size=12_000)),  # Wasserstein (> 1000 reference rows)
        (rng.integers(0, 4, 500).astype(float), rng.integers(0, 4, 5_000).astype(float)),  # few values
    ]
    cases[0][1][:5] = [np.nan, np.inf, -np.inf, np.nan, 1e300]
    cases[2][1][:3] = cases[2][0][:3]  # current values equal to reference values
    for ref, cur in cases:
        sites = rng.integers(0, 3, len(cur))
        overall, per_site = _column_tests("x", np.sort(ref), _Column(cur, sites, 3))
        for ours, values in [(overall, cur), *zip(per_site, (cur[sites == s] for s in range(3)), strict=True)]:
            clean_ref = pd.Series(ref).replace([np.inf, -np.inf], np.nan).dropna()
            clean_cur = pd.Series(values).replace([np.inf, -np.inf], np.nan).dropna()
            test = get_stattest(clean_ref, clean_cur, ColumnType.Numerical, None)
            theirs = test(clean_ref, clean_cur, ColumnType.Numerical, None)
            assert ours.test == test.name
            assert ours.drifted == theirs.drifted
            assert ours.score == pytest.approx(theirs.drift_score, rel=1e-9, abs=1e-300)


def test_binning_equals_searchsorted():
    rng = np.random.default_rng(5)
    points = np.unique(np.round(rng.lognormal(size=400), 3))
    values = np.concatenate(
        [rng.lognormal(size=100_000), points, np.round(rng.lognormal(size=1000), 3), [-1e300, 1e300]]
    )
    bins, equal = _bin_right(values, points)
    np.testing.assert_array_equal(bins, np.searchsorted(points, values, side="right"))
    np.testing.assert_array_equal(equal, np.flatnonzero(np.isin(values, points)))


def test_verdict_equals_plain_evidently_data_drift_preset(reference, medops_home):
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    current = window(reference, 3_000, "a", 9, scale=1.03)
    found = detect_drift(current, reference, medops_home, report=False)
    definition = DataDefinition(numerical_columns=list(FEATURES))
    snapshot = Report([DataDriftPreset(drift_share=medops_home.drift_share_threshold)]).run(
        Dataset.from_pandas(current[list(FEATURES)], data_definition=definition),
        Dataset.from_pandas(reference[list(FEATURES)], data_definition=definition),
    )
    evidently_drifted = set()
    for metric in snapshot.dict()["metrics"]:
        if metric["metric_name"].startswith("ValueDrift"):
            column = metric["config"]["column"]
            if metric["value"] <= found.columns[column].threshold:  # KS: drift when p <= 0.05
                evidently_drifted.add(column)
    assert set(found.drifted_columns) == evidently_drifted
    share = snapshot.dict()["metrics"][0]["value"]["share"]
    assert found.share == pytest.approx(share)


def test_prediction_drift_and_performance_from_feedback(reference, medops_home):
    rng = np.random.default_rng(3)
    current = window(reference, 400, "site-a", 10)
    truth = current[LABEL].eq("malignant").to_numpy()
    current[PROBABILITY] = np.clip(truth * 0.7 + rng.normal(0.15, 0.1, len(current)), 0, 1)
    current["label"] = np.where(current[PROBABILITY] >= 0.5, "malignant", "benign")
    reference_probabilities = rng.uniform(0, 1, len(reference))  # a different score distribution
    feedback = pd.DataFrame(
        {
            "logged_at": pd.Timestamp("2026-01-01", tz="UTC"),
            "encounter_hash": current["encounter_hash"].iloc[:100],
            LABEL: current[LABEL].iloc[:100],
        }
    )
    current = current.drop(columns=[LABEL])  # the log has no true label; feedback brings it
    found = detect_drift(
        current,
        reference,
        medops_home,
        reference_probabilities=reference_probabilities,
        feedback=feedback,
        metadata={"model_version": "7"},
    )
    assert found.prediction_drift is not None and found.prediction_drift.drifted
    assert PROBABILITY not in found.columns  # prediction drift is reported apart from the feature share
    assert found.performance.n_labelled == 100
    assert found.performance.sensitivity == 1.0 and found.performance.roc_auc > 0.9
    # the very metrics training and the gate compute, on the first 100 (labelled) predictions
    first = current.iloc[:100]
    expected = clinical_metrics(truth[:100], first[PROBABILITY].to_numpy(), first["label"].eq("malignant").to_numpy())
    assert {name: value for name, value in asdict(found.performance).items() if name in expected} == {
        name: value for name, value in expected.items() if name != "n"
    }
    assert found.drift_snapshot is not None and found.performance_snapshot is not None
    assert found.performance_snapshot.to_snapshot_model().metadata["model_version"] == "7"
    summary = json.dumps(found.summary())
    drift_json = found.drift_snapshot.json() + found.performance_snapshot.json()
    for encounter in current["encounter_hash"].iloc[:20]:  # no patient identifier reaches a report
        assert encounter not in summary and encounter not in drift_json


def test_scores_from_other_model_versions_leave_prediction_drift_out(reference, medops_home):
    current = window(reference, 300, "site-a", 12)
    current[PROBABILITY] = np.nan  # every row was served by a version other than the champion
    found = detect_drift(current, reference, medops_home, reference_probabilities=np.full(len(reference), 0.4))
    assert found.prediction_drift is None and found.verdict == Verdict.NO_DRIFT
    assert found.drift_snapshot is not None


def test_label_predictions_keeps_the_latest_label_and_drops_the_hash():
    current = pd.DataFrame(
        {"encounter_hash": ["h1", "h2", ""], PROBABILITY: [0.9, 0.2, 0.5], "label": ["malignant", "benign", "benign"]}
    )
    feedback = pd.DataFrame(
        {
            "logged_at": pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-01"], utc=True),
            "encounter_hash": ["h1", "h1", "h2"],
            LABEL: ["benign", "malignant", "benign"],
        }
    )
    labelled = label_predictions(current, feedback)
    assert sorted(labelled[LABEL]) == ["benign", "malignant"]
    assert "encounter_hash" not in labelled.columns


def test_performance_with_one_class_is_none_where_undefined_and_json_safe():
    labelled = pd.DataFrame(
        {PROBABILITY: [0.1, 0.3, 0.7], "label": ["benign", "benign", "malignant"], LABEL: ["benign"] * 3}
    )
    performance = classification_performance(labelled)
    assert performance.sensitivity is None and performance.roc_auc is None and performance.npv == 1.0
    assert performance.specificity == pytest.approx(2 / 3) and (performance.fp, performance.n_malignant) == (1, 0)
    json.dumps(asdict(performance), allow_nan=False)  # NaN would not be valid JSON
