"""Training, the operating threshold, the MLflow run and the gate's decision on the stored hold-out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medops.core.settings import Settings
from pipelines import model_registry
from pipelines.holdout import split_by_row_key
from pipelines.metrics import LINEAR_IMPORTANCE, PERMUTATION_IMPORTANCE, clinical_metrics, feature_importance
from pipelines.schema import FEATURES, LABEL
from pipelines.train import (
    FitResult,
    choose_threshold,
    fit_candidate,
    log_run,
    promote,
    record_training_run,
    register_version,
    train_model,
)


def test_clinical_metrics_treat_malignant_as_positive():
    is_malignant = np.array([True, True, True, False, False])
    predicted = np.array([True, True, False, False, True])
    probability = np.array([0.9, 0.8, 0.3, 0.1, 0.6])
    metrics = clinical_metrics(is_malignant, probability, predicted)
    assert metrics["sensitivity"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == pytest.approx(1 / 2)
    assert metrics["ppv"] == pytest.approx(2 / 3)
    assert metrics["npv"] == pytest.approx(1 / 2)
    assert (metrics["tp"], metrics["fn"], metrics["tn"], metrics["fp"]) == (2, 1, 1, 1)
    assert metrics["accuracy"] == pytest.approx(3 / 5) and metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["brier"] == pytest.approx(np.mean((probability - is_malignant) ** 2))


def test_undefined_metrics_are_none_and_fail_the_gate():
    no_malignant = np.array([False, False, False])
    metrics = clinical_metrics(no_malignant, np.array([0.1, 0.6, 0.2]), np.array([False, True, False]))
    assert metrics["sensitivity"] is None and metrics["roc_auc"] is None and metrics["ppv"] == 0.0
    assert metrics["specificity"] == pytest.approx(2 / 3)
    json.dumps(metrics, allow_nan=False)  # NaN would not be valid JSON
    from pipelines.gate import decide
    from pipelines.protocol import load_protocol

    scores = (no_malignant, np.array([0.1, 0.6, 0.2]), np.array([False, True, False]))
    decision = decide(scores, None, np.array(["site-a"] * 3), load_protocol())
    assert not decision.passed
    assert "overall: no malignant hold-out rows, so sensitivity cannot be judged: refused" in decision.reasons
    assert any("ROC AUC cannot be estimated" in reason for reason in decision.reasons)


def test_linear_importance_is_the_coefficient_times_the_feature_spread(registry_home: Settings):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipelines.data_registry import load_version_frame

    train, holdout = split_by_row_key(load_version_frame("data-v1", registry_home))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(train[list(FEATURES)], train[LABEL])
    found = feature_importance(model, train, holdout, seed=0)
    # scaled on the same training rows, |coef on raw feature| x std is |coef on the scaled one|
    coef = np.abs(model[-1].coef_[0])
    assert found.method == LINEAR_IMPORTANCE
    assert list(found.importance) == list(FEATURES)
    assert np.allclose(list(found.importance.values()), coef / coef.sum(), rtol=1e-9)


def test_threshold_meets_the_sensitivity_target_out_of_fold(registry_home: Settings):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipelines.data_registry import load_version_frame

    train, _ = split_by_row_key(load_version_frame("data-v1", registry_home))
    estimator = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    strict = choose_threshold(estimator, train, 0.99, registry_home)
    loose = choose_threshold(estimator, train, 0.90, registry_home)
    assert 0 < strict <= loose <= 0.5


def test_train_registers_challenger_and_promotes_through_the_gate(registry_home: Settings, tmp_path):
    import mlflow

    result = train_model(
        registry_home, families=["logistic_regression"], trigger="manual", airflow_run_id="manual__test"
    )
    assert result.family == "logistic_regression" and result.data_version == "data-v1"
    assert result.metrics["sensitivity"] >= 0.95 and result.metrics["roc_auc"] >= 0.97
    assert result.gate.passed
    assert model_registry.alias_version(model_registry.CHALLENGER, registry_home) == result.model_version
    assert model_registry.champion_version(registry_home) is None  # not before promote

    tags = model_registry.version_tags(result.model_version, registry_home)
    assert tags["data_version"] == "data-v1" and tags["gate_decision"] == "passed"
    assert tags["gate_passed"] == "true" and tags["gate_reason"].startswith("promote: protocol v1")
    assert tags["protocol_version"] == "1" and len(tags["protocol_sha256"]) == 64
    assert tags["holdout_rows"] == str(result.holdout["rows"]) and len(tags["holdout_sha256"]) == 64
    assert float(tags["sensitivity_lower"]) == pytest.approx(result.gate.overall.candidate.sensitivity.lower, abs=1e-4)
    assert float(tags["threshold"]) == pytest.approx(result.threshold, abs=1e-6)

    run = mlflow.get_run(result.run_id)
    assert run.data.tags["data_version"] == "data-v1"
    assert run.data.tags["airflow_run_id"] == "manual__test"
    assert run.data.tags["code_git_sha"]
    assert run.data.tags["data_dvc_md5"].endswith(".dir")
    for metric in ("roc_auc", "sensitivity", "specificity", "ppv", "npv", "f1", "brier"):
        assert metric in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"roc_curve.png", "confusion_matrix.png", "calibration.png", "model_card", "gate"} <= artifacts
    local = mlflow.MlflowClient().download_artifacts(result.run_id, "gate/decision.json", str(tmp_path))
    assert json.loads(open(local).read()) == result.gate.to_dict()
    assert run.data.metrics["gate_passed"] == 1.0 and "gate_sensitivity_lower" in run.data.metrics
    inputs = [i.dataset.name for i in run.inputs.dataset_inputs]
    assert "data-v1-train" in inputs

    assert promote(result, registry_home)
    assert model_registry.champion_version(registry_home) == result.model_version

    # The stored model predicts with its operating threshold.
    model = model_registry.load_model(result.model_version, registry_home)
    assert model.threshold == pytest.approx(result.threshold)
    assert list(model.classes_) == ["benign", "malignant"]


def test_a_model_that_fails_the_gate_is_not_promoted(registry_home: Settings):
    # a stricter floor than the protocol's needs nobody's approval, and no hold-out of this size reaches it
    result = train_model(registry_home, families=["logistic_regression"], thresholds={"sensitivity_lower": 0.99})
    assert not result.gate.passed
    assert not promote(result, registry_home)
    assert model_registry.champion_version(registry_home) is None
    assert model_registry.version_tags(result.model_version, registry_home)["gate_decision"] == "rejected"


def test_a_promotion_after_a_concurrent_one_is_judged_against_the_new_champion(registry_home: Settings):
    """Two trainings gated against the same champion (none): the second to promote meets the first's."""
    from pipelines import governance

    first, second = (train_model(registry_home, families=["logistic_regression"]) for _ in range(2))
    assert first.gate.champion_version is None and second.gate.champion_version is None
    assert promote(first, registry_home)
    assert promote(second, registry_home)  # same rows, same model: non-inferior to the first
    assert model_registry.champion_version(registry_home) == second.model_version
    tags = model_registry.version_tags(second.model_version, registry_home)
    assert tags["champion_compared"] == first.model_version and tags["previous_champion"] == first.model_version
    decisions = governance.entries_about(second.model_version, registry_home, ("gate_decision",))
    assert [entry.reason.startswith("judged again: @champion moved to v") for entry in decisions] == [False, True]


def test_unknown_family_is_a_clear_error(registry_home: Settings):
    with pytest.raises(ValueError, match="unknown model family random_forest"):
        train_model(registry_home, families=["random_forest"])


def test_every_family_logs_and_loads_back_through_mlflow(registry_home: Settings):
    """MLflow stores scikit-learn models in the safe skops format: every family must round-trip."""
    from pipelines.data_registry import load_version_frame

    rows = load_version_frame("data-v1", registry_home).head(30)
    for family in ("svm", "gradient_boosting"):
        result = train_model(registry_home, families=[family])
        model = model_registry.load_model(result.model_version, registry_home)
        assert result.family == family
        assert model.predict_proba(rows[list(FEATURES)]).shape == (30, 2)
        stored = model_registry.stored_reference(result.model_version, registry_home)
        assert stored.importance_method == PERMUTATION_IMPORTANCE  # no coefficients to read
        assert sum(stored.importance.values()) == pytest.approx(1.0)
        assert min(stored.importance.values()) >= 0 and max(stored.importance.values()) > 1 / len(FEATURES)


def test_fit_log_and_register_each_run_alone(registry_home: Settings, tmp_path):
    """The three steps with only paths, ids and JSON between them, as the DAG's tasks run them."""
    import mlflow

    fit = fit_candidate(registry_home, "data-v1", ["logistic_regression"], work_dir=tmp_path / "work")
    assert {p.name for p in (tmp_path / "work").iterdir()} == {"model.skops", "figures", "reference"}
    assert {p.name for p in fit.reference_dir.iterdir()} == {"train.csv", "holdout.csv", "importance.json"}
    assert fit.metrics["sensitivity"] >= 0.95
    assert fit.split["holdout_rule"] == "sha256-row-key" and fit.holdout["rows"] == fit.holdout_rows
    model_registry.configure_mlflow(registry_home)  # fitting no longer touches MLflow: point it at this store
    assert mlflow.search_runs(search_all_experiments=True).empty  # fitting logs nothing
    passed_on = FitResult.from_dict(json.loads(json.dumps(fit.to_dict(), allow_nan=False)))
    assert passed_on == fit

    run_id = log_run(passed_on, registry_home, trigger="manual", airflow_run_id="manual__steps")
    assert model_registry.alias_version(model_registry.CHALLENGER, registry_home) is None  # not registered yet
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "reference")}
    assert logged == {"reference/train.csv", "reference/holdout.csv", "reference/importance.json"}
    assert mlflow.get_run(run_id).data.params["test_rows"] == str(fit.holdout_rows)

    first = register_version(run_id, passed_on, registry_home, airflow_run_id="manual__steps")
    again = register_version(run_id, passed_on, registry_home, airflow_run_id="manual__steps")  # a retried task
    assert first.model_version == again.model_version == "1" and first.gate.passed
    assert model_registry.alias_version(model_registry.CHALLENGER, registry_home) == "1"
    version = model_registry.client(registry_home).get_model_version(registry_home.model_name, "1")
    assert version.run_id == run_id and version.description.startswith("# Model card: ")
    assert model_registry.version_tags("1", registry_home)["airflow_run_id"] == "manual__steps"
    card = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "model_card")}
    assert card == {"model_card/model_card.md", "model_card/model_card.html"}

    # the registered model is the fitted one, bit for bit
    stored = model_registry.stored_reference("1", registry_home)
    registered = model_registry.load_model("1", registry_home)
    assert np.array_equal(
        registered.predict_proba(stored.holdout[list(FEATURES)])[:, 1], stored.holdout["probability_malignant"]
    )


def test_the_fanned_out_search_chooses_what_the_single_search_chooses(registry_home: Settings):
    """Mapped per-family searches + choose_best give the family, parameters and scores search_best gives."""
    from pipelines import data_registry
    from pipelines.train import choose_best, search_best, search_family, training_rows

    families = ["logistic_regression", "gradient_boosting"]
    searches = [search_family(registry_home, "data-v1", family) for family in families]
    assert all(set(s) == {"family", "data_version", "cv_roc_auc", "params"} for s in searches)
    json.dumps(searches)  # only names and numbers travel between tasks, never frames
    chosen = choose_best(searches)

    train, _ = training_rows(data_registry.load_version_frame("data-v1", registry_home))
    family, estimator, scores = search_best(train, families, registry_home)
    assert chosen["family"] == family and chosen["cv_scores"] == pytest.approx(scores)
    assert {f"model__{k}" if not k.startswith("model__") else k: v for k, v in chosen["params"].items()}.items() <= (
        estimator.get_params().items()
    )


def test_choose_best_refuses_mixed_data_versions_and_an_empty_search():
    from pipelines.train import choose_best

    with pytest.raises(ValueError, match="no family"):
        choose_best([])
    mixed = [
        {"family": "svm", "data_version": "data-v1", "cv_roc_auc": 0.99, "params": {}},
        {"family": "logistic_regression", "data_version": "data-v2", "cv_roc_auc": 0.98, "params": {}},
    ]
    with pytest.raises(ValueError, match="data-v1, data-v2"):
        choose_best(mixed)
    tie = [{**mixed[0], "cv_roc_auc": 0.99}, {**mixed[1], "data_version": "data-v1", "cv_roc_auc": 0.99}]
    assert choose_best(tie)["family"] == "logistic_regression"  # the simplest family wins a tie


def test_fit_with_a_chosen_family_does_not_search_again(registry_home: Settings, tmp_path, monkeypatch):
    from pipelines import train as train_module

    chosen = train_module.choose_best([train_module.search_family(registry_home, "data-v1", "logistic_regression")])
    monkeypatch.setattr(train_module, "search_best", lambda *a, **k: pytest.fail("searched again"))
    result = train_module.fit_candidate(registry_home, "data-v1", work_dir=tmp_path / "work", chosen=chosen)
    assert result.family == "logistic_regression" and result.cv_roc_auc == chosen["cv_scores"]
    with pytest.raises(ValueError, match="not on data-v2"):
        train_module.fit_candidate(registry_home, "data-v2", work_dir=tmp_path / "other", chosen=chosen)


def test_a_worker_host_fits_and_logs_from_the_network_and_the_scheduler_side_audits(registry_home: Settings, tmp_path):
    """As the cluster's train worker runs `fit`: the registry from its git remote into a home of its own,
    the run to MLflow (its datasets' source is the remote); the audit entry is written on the
    scheduler's side from the run's tags, once."""
    import mlflow

    from medops.core import audit

    worker = Settings(
        home=tmp_path / "worker-host",
        registry_url=str(registry_home.registry_dir),
        dvc_remote=registry_home.dvc_remote_url,
        mlflow_tracking_uri=registry_home.tracking_uri,
    )
    work = tmp_path / "worker-host" / "training" / "run"
    fit = fit_candidate(worker, "data-v1", ["logistic_regression"], work_dir=work)
    run_id = log_run(fit, worker, trigger="manual", airflow_run_id="manual__hosts", audit=False)
    (dataset,) = [d.dataset for d in mlflow.get_run(run_id).inputs.dataset_inputs if d.dataset.name.endswith("train")]
    assert json.loads(dataset.source)["url"] == f"{registry_home.registry_dir}@data-v1"
    assert not (worker.home / "audit").exists() and not (worker.home / "secrets").exists()
    passed_on = FitResult.from_dict(json.loads(json.dumps(fit.to_dict())))
    for _ in range(2):  # a retried register finds the entry
        record_training_run(passed_on, run_id, registry_home, trigger="manual", airflow_run_id="manual__hosts")
    (entry,) = [e for e in audit.entries(registry_home) if e.action == "training_run"]
    assert entry.links["run_id"] == run_id and entry.details["data_versions_seen"] == ["data-v1"]
