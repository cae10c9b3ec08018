"""Who did what, and who must sign off: the audit trail's entries and the protocol's approvals, applied.

Every decision goes to the hash-chained audit log (:mod:`medops.core.audit`) through :func:`record`,
with an actor that names someone (:data:`SCHEDULER` for what the platform did on its own). An entry
about a training run or a model version also leaves its hash on it in MLflow (tag ``audit.<seq>``),
outside the log, so that rewriting the log consistently from some entry to its end is caught by
:func:`verify_trail`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from medops.core import audit
from medops.core.settings import Settings

if TYPE_CHECKING:
    from pipelines.protocol import Protocol

SCHEDULER = "medops-scheduler"
ANCHOR_PREFIX = "audit."


class ApprovalRequired(PermissionError):
    """The change needs a named person's approval under the modification protocol, and has none."""


def terminal_user() -> str:
    """The operating-system user running a ``medops`` command: the actor of what they do by hand."""
    import getpass

    return getpass.getuser()


def named_person(name: str | None, what: str) -> str:
    """``name`` stripped, or ValueError when it names nobody ("approver", "unknown", blank)."""
    cleaned = (name or "").strip()
    if cleaned.lower() in audit.PLACEHOLDER_ACTORS:
        raise ValueError(f"{what}: {name!r} names nobody; give the person's user name")
    return cleaned


def record(
    action: str,
    *,
    actor: str,
    reason: str,
    settings: Settings,
    links: Mapping[str, Any] | None = None,
    details: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    model_version: str | None = None,
    anchored: bool = True,
) -> audit.AuditEntry:
    """Append one audit entry; anchor its hash on the MLflow run and/or model version it is about.

    ``run_id`` and ``model_version`` are added to the links; with ``anchored`` the entry's hash is
    also tagged on them (``audit.<seq>``, read back by :func:`mlflow_anchors`).
    """
    links = {**(links or {})}
    if run_id:
        links["run_id"] = run_id
    if model_version:
        links["model_version"] = str(model_version)
    entry = audit.append(action, actor=actor, reason=reason, links=links, details=details, settings=settings)
    if anchored:
        anchor(entry, settings, run_id=run_id, model_version=model_version)
    return entry


def anchor(
    entry: audit.AuditEntry, settings: Settings, *, run_id: str | None = None, model_version: str | None = None
) -> None:
    """Keep an entry's hash on the MLflow run and/or model version it is about (tag ``audit.<seq>``)."""
    if not (run_id or model_version):
        return
    from pipelines import model_registry

    client = model_registry.client(settings)
    key = f"{ANCHOR_PREFIX}{entry.seq}"
    if run_id:
        client.set_tag(run_id, key, entry.hash)
    if model_version:
        client.set_model_version_tag(settings.model_name, str(model_version), key, entry.hash)


def mlflow_anchors(settings: Settings) -> dict[int, str]:
    """Every ``audit.<seq>`` tag on medops' training runs and model versions, as seq -> hash.

    Empty when the MLflow store does not exist yet. Two different hashes recorded for one seq
    mean somebody changed a tag: the first one seen wins, and verification fails on that entry
    unless the log matches it.
    """
    if settings.tracking_uri.startswith("sqlite:///") and not (settings.mlflow_dir / "mlflow.db").exists():
        return {}
    from pipelines import model_registry

    client = model_registry.client(settings)
    tag_sets: list[Mapping[str, str]] = []
    experiment = client.get_experiment_by_name(model_registry.EXPERIMENT)
    if experiment is not None:
        page_token = None
        while True:
            runs = client.search_runs([experiment.experiment_id], max_results=1000, page_token=page_token)
            tag_sets += [run.data.tags for run in runs]
            page_token = runs.token
            if not page_token:
                break
    tag_sets += [version.tags for version in client.search_model_versions(f"name = '{settings.model_name}'")]
    anchors: dict[int, str] = {}
    for tags in tag_sets:
        for key, value in tags.items():
            if key.startswith(ANCHOR_PREFIX) and key[len(ANCHOR_PREFIX) :].isdigit():
                anchors.setdefault(int(key[len(ANCHOR_PREFIX) :]), value)
    return anchors


def verify_trail(settings: Settings) -> tuple[audit.Verification, int]:
    """(the chain's verification against the MLflow anchors, how many anchors were checked)."""
    anchors = mlflow_anchors(settings)
    return audit.verify(settings, anchors=anchors), len(anchors)


def entries_about(
    model_version: str, settings: Settings, actions: Iterable[str] | None = None
) -> list[audit.AuditEntry]:
    """The audit entries that link to a model version (optionally only these actions), oldest first."""
    wanted = set(actions) if actions is not None else None
    return [
        entry
        for entry in audit.entries(settings)
        if entry.links.get("model_version") == str(model_version) and (wanted is None or entry.action in wanted)
    ]


def training_approvals(
    settings: Settings,
    protocol: Protocol,
    *,
    families: Sequence[str],
    thresholds: Mapping[str, Any] | None,
    trigger: str,
) -> list[str]:
    """Why promoting what this training produces needs a named person; empty = the gate alone decides.

    The protocol's cases (a family or feature outside it, thresholds looser than its floors,
    drift-triggered or every promotion when it asks for them), plus ``MEDOPS_REQUIRE_APPROVAL``
    for drift-triggered retraining, which keeps its meaning on top of the protocol.
    """
    from pipelines.protocol import approval_reasons
    from pipelines.schema import FEATURES

    reasons = approval_reasons(
        protocol,
        family=list(families),
        features=list(FEATURES),
        thresholds=dict(thresholds or {}) or None,
        trigger=trigger,
    )
    if trigger == "drift" and settings.require_approval:
        reasons.append("MEDOPS_REQUIRE_APPROVAL=true: drift-triggered promotions wait for a person")
    return reasons
