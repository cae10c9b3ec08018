"""Steps downstream of training read the rows, scores and importances the training run stored.

The rollout's smoke test (hold-out rows) and drift monitoring (training rows with the champion's
scores) must compare against exactly what training used, whatever the settings say today.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medops.core.settings import Settings
from pipelines import model_registry
from pipelines.data_registry import load_version_frame
from pipelines.holdout import split_by_row_key
from pipelines.metrics import LINEAR_IMPORTANCE, probability_malignant
from pipelines.schema import DATA_COLUMNS, FEATURES
from pipelines.train import train_model


def test_readers_return_the_logged_rows_after_the_split_settings_changed(registry_home: Settings):
    from monitoring.reports import load_reference
    from serving import rollout

    result = train_model(registry_home, families=["logistic_regression"])
    version = result.model_version
    model = model_registry.load_model(version, registry_home)
    frame = load_version_frame("data-v1", registry_home)
    train, holdout = split_by_row_key(frame)

    # another hold-out share (a later protocol) and another seed would give other rows today
    changed = registry_home.model_copy(update={"seed": 7})
    other_train, other_holdout = split_by_row_key(frame, 0.35)
    assert len(other_holdout) != len(holdout)
    assert not other_train[list(FEATURES)].head(40).equals(train[list(FEATURES)].head(40))

    reference = load_reference(changed, version)
    assert reference.model_version == version and reference.data_version == "data-v1"
    scored_train = train.assign(probability_malignant=probability_malignant(model, train))
    pd.testing.assert_frame_equal(reference.frame, scored_train[[*DATA_COLUMNS, "probability_malignant"]])

    rows = rollout.evaluation_rows(version, changed)
    pd.testing.assert_frame_equal(rows, holdout[list(FEATURES)].head(rollout.SMOKE_ROWS))
    expected_rows, probabilities, labels = rollout.expected_predictions(version, changed)
    pd.testing.assert_frame_equal(expected_rows, rows)
    assert np.array_equal(probabilities, probability_malignant(model, rows))
    assert labels == [str(label) for label in model.predict(rows)]

    stored = model_registry.stored_reference(version, changed)
    assert stored.run_id == result.run_id and len(stored.holdout) == len(holdout)
    assert np.array_equal(stored.holdout["probability_malignant"], probability_malignant(model, holdout))
    assert stored.importance_method == LINEAR_IMPORTANCE and list(stored.importance) == list(FEATURES)
    assert sum(stored.importance.values()) == pytest.approx(1.0)


def test_a_version_without_stored_reference_is_a_clear_error(registry_home: Settings):
    import mlflow
    import mlflow.sklearn
    from sklearn.dummy import DummyClassifier

    from monitoring.reports import load_reference
    from serving import rollout

    rows = load_version_frame("data-v1", registry_home)
    model = DummyClassifier(strategy="prior").fit(rows[list(FEATURES)], rows["diagnosis"])
    with mlflow.start_run(experiment_id=model_registry.ensure_experiment(registry_home)):
        info = mlflow.sklearn.log_model(
            model, name="model", registered_model_name=registry_home.model_name, pip_requirements=["scikit-learn"]
        )
    version = str(info.registered_model_version)
    message = rf"model version {version} of {registry_home.model_name} has no stored reference \(missing reference/"
    for read in (
        lambda: model_registry.stored_reference(version, registry_home),
        lambda: load_reference(registry_home, version),
        lambda: rollout.evaluation_rows(version, registry_home),
    ):
        with pytest.raises(model_registry.MissingReference, match=message):
            read()
