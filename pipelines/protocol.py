"""The modification protocol: which model changes are automatic and which wait for a named person.

``modification_protocol.yaml`` (next to this module, versioned with the code) states the model
families and features a retraining may use on its own, the hold-out share, the gate's floors on
the lower bounds of sensitivity, specificity and ROC AUC (overall and per site), the
non-inferiority margin against the champion, and the cases that need a person's approval. This
module loads it into validated, typed objects (a wrong value fails with the field's dotted name),
and :func:`approval_reasons` says, for one proposed training or deployment, why a person must sign
it off; an empty list means the change is within the protocol and may proceed automatically.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

PROTOCOL_FILE = Path(__file__).with_name("modification_protocol.yaml")

# Cases that always need a person; a protocol may add the other ApprovalCases, never drop these.
MANDATORY_APPROVALS = (
    "new_model_family",
    "feature_change",
    "thresholds_below_floors",
    "deploy_failed_gate",
    "holdout_change",
)
LOWER_BOUND_FLOORS = (
    "sensitivity_lower",
    "specificity_lower",
    "roc_auc_lower",
    "site_sensitivity_lower",
    "site_specificity_lower",
)
ApprovalCase = Literal[
    "new_model_family",
    "feature_change",
    "thresholds_below_floors",
    "deploy_failed_gate",
    "holdout_change",
    "drift_triggered_promotion",
    "every_promotion",
]


class ProtocolError(ValueError):
    """The protocol file is missing, unreadable or invalid; the message names the file and the field."""


class Thresholds(BaseModel):
    """The gate's floors, one flat record so a trigger form can name each one.

    Lower bounds are judged at ``confidence`` with the ``interval`` method for proportions; the
    champion comparison passes when the lower bound of AUC(candidate) - AUC(champion) is at least
    ``-non_inferiority_margin``; a site is judged on sensitivity (specificity) once it has
    ``site_min_positives`` malignant (``site_min_negatives`` benign) hold-out rows.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    confidence: float = Field(gt=0.5, lt=1.0)
    interval: Literal["wilson", "exact"] = "wilson"
    sensitivity_lower: float = Field(ge=0.0, le=1.0)
    specificity_lower: float = Field(ge=0.0, le=1.0)
    roc_auc_lower: float = Field(ge=0.0, le=1.0)
    non_inferiority_margin: float = Field(ge=0.0, le=1.0)
    site_min_positives: int = Field(ge=1)
    site_min_negatives: int = Field(ge=1)
    site_sensitivity_lower: float = Field(ge=0.0, le=1.0)
    site_specificity_lower: float = Field(ge=0.0, le=1.0)


class AutomaticChanges(BaseModel):
    """What a retraining may use without a person: these families, these features, this hold-out share."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_families: tuple[str, ...] = Field(min_length=1)
    features: tuple[str, ...] = Field(min_length=1)
    holdout_share: float = Field(gt=0.0, lt=1.0)

    @field_validator("model_families", "features")
    @classmethod
    def _unique(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return values


class Protocol(BaseModel):
    """A loaded modification protocol; ``sha256`` identifies the exact file a decision was judged under."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(ge=1)
    effective_from: str
    title: str
    automatic: AutomaticChanges
    gate: Thresholds
    approval_required_for: tuple[ApprovalCase, ...]

    _sha256: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _mandatory_approvals_kept(self) -> Protocol:
        dropped = [case for case in MANDATORY_APPROVALS if case not in self.approval_required_for]
        if dropped:
            raise ValueError(
                f"approval_required_for must keep {', '.join(dropped)}: these changes always need a named person"
            )
        return self

    @property
    def sha256(self) -> str:
        return self._sha256

    def requires(self, case: ApprovalCase) -> bool:
        return case in self.approval_required_for


def load_protocol(path: Path | str | None = None) -> Protocol:
    """Read and validate the protocol (the repository's own by default); ProtocolError names the bad field."""
    import yaml

    path = Path(path) if path is not None else PROTOCOL_FILE
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ProtocolError(f"modification protocol {path}: cannot be read ({error.strerror or error})") from None
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ProtocolError(f"modification protocol {path}: not valid YAML{line}") from None
    if not isinstance(document, dict):
        raise ProtocolError(f"modification protocol {path}: expected a mapping of fields at the top level")
    try:
        protocol = Protocol.model_validate(document)
    except ValidationError as error:
        raise ProtocolError(f"modification protocol {path}: {_describe(error)}") from None
    protocol._sha256 = hashlib.sha256(raw).hexdigest()
    return protocol


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (misspelt?)"
        given = f" (got {item['input']!r})" if item["type"] not in ("missing", "extra_forbidden") else ""
        problems.append(f"{field}: {message}{given}")
    return "; ".join(problems)


def gate_thresholds(protocol: Protocol, overrides: Mapping[str, Any] | None = None) -> Thresholds:
    """The protocol's gate floors with a form's or command line's overrides applied (blank = protocol).

    Unknown names or out-of-range values are a ValueError naming the threshold.
    """
    given = {name: value for name, value in (overrides or {}).items() if value is not None}
    unknown = sorted(set(given) - set(Thresholds.model_fields))
    if unknown:
        raise ValueError(f"unknown gate threshold(s) {', '.join(unknown)}; known: {', '.join(Thresholds.model_fields)}")
    try:
        return Thresholds.model_validate(protocol.gate.model_dump() | given)
    except ValidationError as error:
        first = error.errors()[0]
        raise ValueError(f"gate threshold {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def thresholds_below_floors(protocol: Protocol, thresholds: Thresholds | Mapping[str, Any] | None) -> list[str]:
    """Each threshold that is looser than the protocol's floor, as text (an empty list when none).

    Looser means: a lower bound floor set lower, a larger non-inferiority margin, more hold-out
    rows required before a site is judged, a lower confidence, or Wilson where the protocol
    asks for exact intervals. ``thresholds`` may be a partial mapping (a trigger form's overrides).
    """
    if thresholds is None:
        return []
    floors = protocol.gate
    merged = thresholds if isinstance(thresholds, Thresholds) else gate_thresholds(protocol, thresholds)
    looser = []
    for name in LOWER_BOUND_FLOORS:
        if getattr(merged, name) < getattr(floors, name):
            looser.append(f"{name} {getattr(merged, name):g} < protocol floor {getattr(floors, name):g}")
    for name in ("non_inferiority_margin", "site_min_positives", "site_min_negatives"):
        if getattr(merged, name) > getattr(floors, name):
            looser.append(f"{name} {getattr(merged, name):g} > protocol limit {getattr(floors, name):g}")
    if merged.confidence < floors.confidence:
        looser.append(f"confidence {merged.confidence:g} < protocol {floors.confidence:g}")
    if floors.interval == "exact" and merged.interval == "wilson":
        looser.append("interval wilson where the protocol asks for exact (Clopper-Pearson)")
    return looser


def approval_reasons(
    protocol: Protocol,
    *,
    family: str | Iterable[str],
    features: Sequence[str],
    thresholds: Thresholds | Mapping[str, Any] | None,
    gate_passed_for_deploy: bool | None = None,
    holdout_share: float | None = None,
    trigger: str | None = None,
) -> list[str]:
    """Why this change needs a named person's approval under the protocol; empty = automatic change allowed.

    ``family`` is the chosen family (or every family a search may choose from); ``thresholds``,
    ``holdout_share``: None = the protocol's own; ``gate_passed_for_deploy``: the gate outcome of a
    version about to be served (None when nothing is being deployed). The promotion cases
    (``drift_triggered_promotion``, ``every_promotion``) are not raised again at deployment.
    """
    if isinstance(features, str):
        raise ValueError("features: give the list of feature names, not one string")
    reasons = []
    families = [family] if isinstance(family, str) else list(family)
    new = [name for name in families if name not in protocol.automatic.model_families]
    if new and protocol.requires("new_model_family"):
        reasons.append(
            f"new model family {', '.join(new)}: protocol v{protocol.version} allows "
            f"{', '.join(protocol.automatic.model_families)} automatically"
        )
    added = [name for name in features if name not in protocol.automatic.features]
    removed = [name for name in protocol.automatic.features if name not in set(features)]
    if (added or removed) and protocol.requires("feature_change"):
        changes = [f"added {', '.join(added)}"] if added else []
        changes += [f"removed {', '.join(removed)}"] if removed else []
        reasons.append(f"feature change ({'; '.join(changes)}) from protocol v{protocol.version}'s feature list")
    looser = thresholds_below_floors(protocol, thresholds)
    if looser and protocol.requires("thresholds_below_floors"):
        reasons.append(f"gate thresholds below protocol v{protocol.version}'s floors: {'; '.join(looser)}")
    if gate_passed_for_deploy is False and protocol.requires("deploy_failed_gate"):
        reasons.append("deploying a version whose gate did not pass")
    if (
        holdout_share is not None
        and abs(holdout_share - protocol.automatic.holdout_share) > 1e-12
        and protocol.requires("holdout_change")
    ):
        reasons.append(
            f"hold-out share {holdout_share:g} instead of protocol v{protocol.version}'s "
            f"{protocol.automatic.holdout_share:g}: rows would move between training and hold-out"
        )
    promoting = gate_passed_for_deploy is None
    if promoting and trigger == "drift" and protocol.requires("drift_triggered_promotion"):
        reasons.append(f"protocol v{protocol.version} asks a person to approve drift-triggered promotions")
    if promoting and protocol.requires("every_promotion"):
        reasons.append(f"protocol v{protocol.version} asks a person to approve every promotion")
    return reasons
