"""Lineage in one call: from a served prediction back to the exact rows its model learnt from.

prediction log row (found by its encounter id's keyed hash) -> model version (MLflow registry) ->
training run (tags, params, code sha, Airflow run id) -> gate decision and the audit trail's
approvals and decisions -> data versions (registry tags, DVC hashes) -> the rows, which
:func:`restore_rows` writes and proves against the data version restored from the DVC remote.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medops.core.settings import Settings
from pipelines import governance, model_registry
from pipelines.schema import DATA_COLUMNS, SITE

TRAIN_FILE = "train.csv"
HOLDOUT_FILE = "holdout.csv"
MANIFEST_FILE = "lineage.json"


class LineageError(RuntimeError):
    """The chain cannot be walked or the rows cannot be proven; the message says which link broke."""


@dataclass
class Lineage:
    """One walk of the chain; plain values only (``to_dict`` is JSON)."""

    model: dict[str, Any]
    run: dict[str, Any]
    gate: dict[str, Any] | None
    decisions: list[dict[str, Any]]
    data_versions: list[dict[str, Any]]
    holdout: dict[str, Any]
    prediction: dict[str, Any] | None = None
    restored: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trace_encounter(encounter_id: str, settings: Settings) -> Lineage:
    """The lineage of the latest prediction served for an encounter (looked up by its keyed hash)."""
    from pipelines.prediction_log import hash_encounter_id, read_predictions

    digest = hash_encounter_id((encounter_id or "").strip(), settings)
    if not digest:
        raise ValueError("encounter id: give the id the clinical application sent with the prediction")
    predictions = read_predictions(settings)
    found = predictions[predictions["encounter_hash"] == digest]
    if found.empty:
        raise LineageError(f"no prediction logged for that encounter id (encounter hash {digest[:12]}…)")
    latest = found.iloc[-1]
    lineage = trace_version(str(latest["model_version"]), settings)
    lineage.prediction = {
        "logged_at": latest["logged_at"].isoformat(),
        **{key: str(latest[key]) for key in ("request_id", "encounter_hash", SITE, "model_name", "model_version")},
        "probability_malignant": float(latest["probability_malignant"]),
        "label": str(latest["label"]),
        "predictions_for_encounter": len(found),
    }
    return lineage


def trace_version(version: str, settings: Settings) -> Lineage:
    """The chain from a model version: run, gate decision, approvals, data versions, hold-out."""
    from mlflow.exceptions import MlflowException

    from pipelines.model_card import data_versions
    from pipelines.train import decision_summary, stored_decision

    client = model_registry.client(settings)
    try:
        model_version = client.get_model_version(settings.model_name, str(version))
    except MlflowException:
        raise LineageError(f"model version {version} of {settings.model_name} is not in the registry") from None
    tags = dict(model_version.tags)
    run_id = model_version.run_id
    run = client.get_run(run_id)
    run_tags, params = dict(run.data.tags), dict(run.data.params)
    decision = stored_decision(run_id, settings)
    return Lineage(
        model={
            "name": settings.model_name,
            "version": str(version),
            "aliases": sorted(model_version.aliases or []),
            "family": tags.get("family") or params.get("family"),
            "threshold": tags.get("threshold") or params.get("threshold"),
            "gate_decision": tags.get("gate_decision"),
            "approved_by": tags.get("approved_by"),
        },
        run={
            "run_id": run_id,
            "url": model_registry.run_url(run_id, settings, run.info.experiment_id),
            **{key: run_tags.get(key) for key in ("trigger", "actor", "airflow_run_id", "code_git_sha")},
            "started": run.info.start_time,
        },
        gate=decision_summary(decision) | {"reasons": decision.reasons} if decision is not None else None,
        decisions=[
            {key: entry.model_dump()[key] for key in ("seq", "time", "action", "actor", "reason", "hash")}
            for entry in governance.entries_about(str(version), settings)
        ],
        data_versions=data_versions(run_tags.get("data_versions_seen") or run_tags.get("data_version", ""), settings),
        holdout={
            "data_version": run_tags.get("data_version"),
            "rule": params.get("holdout_rule"),
            "share": params.get("holdout_share"),
            "rows": run_tags.get("holdout_rows"),
            "malignant": run_tags.get("holdout_malignant"),
            "sha256": run_tags.get("holdout_sha256"),
            "train_rows": params.get("train_rows"),
        },
    )


def restore_rows(version: str, dest: Path, settings: Settings, *, lineage: Lineage | None = None) -> dict[str, Any]:
    """Write the version's exact training and hold-out rows into ``dest`` and prove them; returns the record.

    ``dest/train.csv`` and ``dest/holdout.csv`` are the rows the run stored; ``dest/<data-vN>/`` is the
    data version restored from the DVC remote, which split by the run's hold-out rule must give the
    same bytes and hold-out fingerprint (else :class:`LineageError`). ``dest/lineage.json`` records the
    chain (``lineage``, when the caller traced it already) and the files' SHA-256.
    """
    import tempfile

    from pipelines import data_registry
    from pipelines.data import read_data_dir, write_frame
    from pipelines.holdout import holdout_fingerprint, split_by_row_key

    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty")
    lineage = lineage if lineage is not None else trace_version(version, settings)
    holdout_record = lineage.holdout
    if holdout_record["rule"] != "sha256-row-key" or not holdout_record["share"]:
        raise LineageError(
            f"model version {version} was trained before the hash hold-out (its run records no hold-out rule): "
            "its rows cannot be re-derived from the data version; retrain it"
        )
    stored = model_registry.stored_reference(str(version), settings)
    data_version = stored.data_version or holdout_record["data_version"]
    dest.mkdir(parents=True, exist_ok=True)
    files = {TRAIN_FILE: stored.train, HOLDOUT_FILE: stored.holdout}
    for name, rows in files.items():
        write_frame(rows[list(DATA_COLUMNS)], dest / name)

    data_dir = data_registry.restore_version(data_version, dest / data_version, settings)
    train, holdout = split_by_row_key(read_data_dir(data_dir), float(holdout_record["share"]))
    with tempfile.TemporaryDirectory(prefix="medops-lineage-") as tmp:
        for name, rows in ((TRAIN_FILE, train), (HOLDOUT_FILE, holdout)):
            expected = write_frame(rows, Path(tmp) / name).read_bytes()
            got = (dest / name).read_bytes()
            if got != expected:
                line = _first_differing_line(got, expected)
                raise LineageError(
                    f"{name}: the rows model version {version}'s run stored differ from {data_version} split by the "
                    f"hold-out rule (share {holdout_record['share']}), first at line {line}"
                )
    fingerprint = holdout_fingerprint(holdout).sha256
    if holdout_record["sha256"] and fingerprint != holdout_record["sha256"]:
        raise LineageError(
            f"hold-out fingerprint {fingerprint[:12]}… differs from the {holdout_record['sha256'][:12]}… recorded"
        )
    lineage.restored = {
        "dir": str(dest),
        "data_version_dir": str(data_dir),
        "files": {
            name: {"rows": len(files[name]), "sha256": hashlib.sha256((dest / name).read_bytes()).hexdigest()}
            for name in files
        },
        "verified_against": f"{data_version} restored from the DVC remote, split by the hold-out rule",
        "holdout_fingerprint": fingerprint,
    }
    (dest / MANIFEST_FILE).write_text(json.dumps(lineage.to_dict(), indent=1, default=str) + "\n")
    return lineage.to_dict()


def _first_differing_line(got: bytes, expected: bytes) -> int:
    for number, (a, b) in enumerate(zip(got.splitlines(), expected.splitlines(), strict=False), start=1):
        if a != b:
            return number
    return min(len(got.splitlines()), len(expected.splitlines())) + 1
