"""The modification protocol: loading with field-named errors, and what needs a named person."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from pipelines.protocol import (
    MANDATORY_APPROVALS,
    PROTOCOL_FILE,
    ProtocolError,
    Thresholds,
    approval_reasons,
    load_protocol,
    thresholds_below_floors,
)
from pipelines.schema import FEATURES


@pytest.fixture(scope="module")
def protocol():
    return load_protocol()


def _write(tmp_path: Path, change) -> Path:
    document = yaml.safe_load(PROTOCOL_FILE.read_text())
    change(document)
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_the_repositorys_protocol_allows_todays_training(protocol):
    from pipelines.train import FAMILIES

    assert protocol.version >= 1
    assert protocol.sha256 == hashlib.sha256(PROTOCOL_FILE.read_bytes()).hexdigest()
    assert protocol.automatic.features == FEATURES
    assert set(FAMILIES) <= set(protocol.automatic.model_families)
    assert set(MANDATORY_APPROVALS) <= set(protocol.approval_required_for)
    assert approval_reasons(protocol, family=FAMILIES, features=FEATURES, thresholds=None) == []
    assert approval_reasons(protocol, family="svm", features=list(reversed(FEATURES)), thresholds=protocol.gate) == []


def test_floors_are_below_what_a_perfect_model_can_certify_today(protocol):
    """A floor a perfect model cannot reach on today's ~49 malignant hold-out rows would refuse every model."""
    from pipelines.uncertainty import proportion

    assert protocol.gate.sensitivity_lower < proportion(49, 49).lower
    assert protocol.gate.site_sensitivity_lower < proportion(10, 10).lower  # a site at the minimum size


def test_a_new_model_family_needs_approval(protocol):
    reasons = approval_reasons(
        protocol, family=["logistic_regression", "random_forest"], features=FEATURES, thresholds=None
    )
    assert len(reasons) == 1 and "new model family random_forest" in reasons[0]


def test_a_feature_change_needs_approval(protocol):
    features = [*FEATURES[1:], "patient_age"]
    (reason,) = approval_reasons(protocol, family="svm", features=features, thresholds=None)
    assert "feature change" in reason and "added patient_age" in reason and "removed mean_radius" in reason


def test_a_threshold_lowered_from_the_trigger_form_needs_approval(protocol):
    lowered = {"sensitivity_lower": 0.0, "non_inferiority_margin": 0.5}
    (reason,) = approval_reasons(protocol, family="svm", features=FEATURES, thresholds=lowered)
    assert "sensitivity_lower 0 < protocol floor 0.85" in reason
    assert "non_inferiority_margin 0.5 > protocol limit 0.02" in reason
    stricter = {"sensitivity_lower": 0.9, "site_min_positives": 5, "confidence": 0.99, "interval": "exact"}
    assert approval_reasons(protocol, family="svm", features=FEATURES, thresholds=stricter) == []


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"specificity_lower": 0.5}, "specificity_lower 0.5 < protocol floor 0.7"),
        ({"roc_auc_lower": 0.9}, "roc_auc_lower 0.9 < protocol floor 0.97"),
        ({"site_sensitivity_lower": 0.1}, "site_sensitivity_lower 0.1"),
        ({"site_specificity_lower": 0.1}, "site_specificity_lower 0.1"),
        ({"site_min_positives": 50}, "site_min_positives 50 > protocol limit 10"),
        ({"site_min_negatives": 50}, "site_min_negatives 50 > protocol limit 10"),
        ({"confidence": 0.8}, "confidence 0.8 < protocol 0.95"),
    ],
)
def test_every_looser_threshold_is_named(protocol, override, words):
    assert any(words in line for line in thresholds_below_floors(protocol, override))


def test_exact_protocol_refuses_wilson_without_approval(tmp_path: Path):
    exact = load_protocol(_write(tmp_path, lambda d: d["gate"].update(interval="exact")))
    assert thresholds_below_floors(exact, {"interval": "wilson"}) == [
        "interval wilson where the protocol asks for exact (Clopper-Pearson)"
    ]


def test_an_unknown_threshold_name_is_refused(protocol):
    with pytest.raises(ValueError, match="unknown gate threshold.*min_sensitivity"):
        thresholds_below_floors(protocol, {"min_sensitivity": 0.5})
    with pytest.raises(ValueError, match="sensitivity_lower"):
        thresholds_below_floors(protocol, {"sensitivity_lower": 1.5})


def test_deploying_a_version_whose_gate_failed_needs_approval(protocol):
    (reason,) = approval_reasons(
        protocol, family="svm", features=FEATURES, thresholds=None, gate_passed_for_deploy=False
    )
    assert "gate did not pass" in reason
    assert (
        approval_reasons(protocol, family="svm", features=FEATURES, thresholds=None, gate_passed_for_deploy=True) == []
    )


def test_a_different_holdout_share_needs_approval(protocol):
    (reason,) = approval_reasons(protocol, family="svm", features=FEATURES, thresholds=None, holdout_share=0.3)
    assert "hold-out share 0.3" in reason
    assert approval_reasons(protocol, family="svm", features=FEATURES, thresholds=None, holdout_share=0.2) == []


def test_the_protocol_can_ask_approval_for_more(tmp_path: Path):
    stricter = load_protocol(
        _write(tmp_path, lambda d: d["approval_required_for"].extend(["drift_triggered_promotion"]))
    )
    common = {"family": "svm", "features": FEATURES, "thresholds": None}
    assert approval_reasons(stricter, **common, trigger="data") == []
    assert "drift-triggered" in approval_reasons(stricter, **common, trigger="drift")[0]
    # a deploy of an already approved promotion is not asked again
    assert approval_reasons(stricter, **common, trigger="drift", gate_passed_for_deploy=True) == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["gate"].update(sensitivity_lower=1.5), "gate.sensitivity_lower"),
        (lambda d: d["gate"].update(site_min_positives=0), "gate.site_min_positives"),
        (lambda d: d["gate"].update(interval="normal"), "gate.interval"),
        (lambda d: d["gate"].pop("roc_auc_lower"), "gate.roc_auc_lower: Field required"),
        (lambda d: d["gate"].update(sensitivty_lower=0.9), "gate.sensitivty_lower: unknown field"),
        (lambda d: d["automatic"].update(holdout_share=1.0), "automatic.holdout_share"),
        (lambda d: d["automatic"]["features"].append("mean_radius"), "listed more than once: mean_radius"),
        (lambda d: d["approval_required_for"].remove("deploy_failed_gate"), "must keep deploy_failed_gate"),
        (lambda d: d["approval_required_for"].append("whenever"), "approval_required_for.5"),
    ],
)
def test_an_invalid_protocol_is_refused_naming_the_field(tmp_path: Path, change, field: str):
    path = _write(tmp_path, change)
    with pytest.raises(ProtocolError, match="modification protocol") as error:
        load_protocol(path)
    assert field in str(error.value)
    assert str(path) in str(error.value)


def test_unreadable_protocol_files_are_refused_clearly(tmp_path: Path):
    with pytest.raises(ProtocolError, match="cannot be read"):
        load_protocol(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\ngate: [unclosed\n")
    with pytest.raises(ProtocolError, match="not valid YAML at line"):
        load_protocol(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ProtocolError, match="mapping"):
        load_protocol(listed)


def test_thresholds_are_a_flat_record_a_form_can_fill(protocol):
    assert set(Thresholds.model_fields) == set(protocol.gate.model_dump())
    with pytest.raises(ValueError):
        Thresholds.model_validate(protocol.gate.model_dump() | {"sensitivity_lower": -0.1})
