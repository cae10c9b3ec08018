"""Why and on what a training runs: data announcements, drift (with cooldown), or a person.

A drift-triggered retraining first versions the hospitals' feedback labels, joined with the features
the service logged and validated as any batch, so the new model learns from the drifted site's cases.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd

from medops.core import assets
from medops.core.files import file_lock, sha256_file, write_atomically
from medops.core.settings import Settings
from pipelines import data_registry


def _state_file(settings: Settings):
    return settings.home / "state" / "retraining.json"


def _load_state(settings: Settings) -> dict[str, Any]:
    path = _state_file(settings)
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(state: dict[str, Any], settings: Settings) -> None:
    write_atomically(_state_file(settings), json.dumps(state, indent=1) + "\n")


def _events_by_asset(triggering_events: Any) -> dict[str, list[Any]]:
    """Triggering asset events keyed by asset name (Airflow keys them by asset objects)."""
    grouped: dict[str, list[Any]] = {}
    for key, events in dict(triggering_events or {}).items():
        name = getattr(key, "name", None) or getattr(key, "uri", None) or str(key)
        grouped.setdefault(str(name), []).extend(events or [])
    return grouped


def in_cooldown(settings: Settings, now: datetime | None = None) -> timedelta | None:
    """Time left before another drift-triggered retraining may run, or None when it may run now."""
    last = _load_state(settings).get("last_drift_retraining")
    if not last:
        return None
    left = datetime.fromisoformat(last) + timedelta(hours=settings.retrain_cooldown_hours) - (now or datetime.now(UTC))
    return left if left > timedelta(0) else None


def labelled_feedback_batch(settings: Settings, since: datetime | None = None) -> pd.DataFrame:
    """Feedback labels joined with the features logged for the same encounters (no raw ids)."""
    from pipelines.prediction_log import label_predictions, read_feedback, read_predictions
    from pipelines.schema import DATA_COLUMNS

    feedback = read_feedback(settings)
    if since is not None:
        feedback = feedback[pd.to_datetime(feedback["logged_at"], utc=True) > since]
    if feedback.empty:
        return pd.DataFrame(columns=list(DATA_COLUMNS))
    return label_predictions(read_predictions(settings), feedback)[list(DATA_COLUMNS)].reset_index(drop=True)


def version_feedback(settings: Settings) -> str | None:
    """Validate and version feedback labels received since the last time; returns the new version."""
    from pipelines.data import write_frame
    from pipelines.ingest import record_validated
    from pipelines.validate import validate_batch

    state = _load_state(settings)
    since = datetime.fromisoformat(state["feedback_until"]) if state.get("feedback_until") else None
    now = datetime.now(UTC)
    batch = labelled_feedback_batch(settings, since=since)
    state["feedback_until"] = now.isoformat()
    if batch.empty:
        _save_state(state, settings)
        return None
    raw = batch.astype({name: "string" for name in ("diagnosis", "site_id")})
    sha256 = sha256_file(write_frame(batch, settings.home / "state" / "feedback-batch.csv"))
    name = f"feedback-{now:%Y%m%dT%H%M%S}.csv"
    # Checked against the registry's rows and recorded under one lock and journal, as an ingest is.
    with data_registry.locked_registry(settings):
        result = validate_batch(raw, existing_keys=data_registry.existing_row_keys(settings))
        version, _ = record_validated(
            result, name=name, label=name, sha256=sha256, settings=settings, origin="feedback"
        )
    _save_state(state, settings)
    return version.tag if version else None


def plan_training(
    settings: Settings, *, triggering_events: Any = None, data_version: str | None = None
) -> dict[str, Any] | None:
    """What ``train_model`` should do for this run, or None to skip it (drift inside the cooldown)."""
    events = _events_by_asset(triggering_events)
    # A data version drift retraining made is announced naming the run that already trains on it.
    fresh = [e for e in events.get(assets.DATA, []) if not (getattr(e, "extra", None) or {}).get("trained_by")]
    if assets.DATA in events and not fresh and assets.DRIFT not in events and data_version is None:
        trained_by = {e.extra["trained_by"] for e in events[assets.DATA]}
        print(f"data announced by retraining run(s) {', '.join(sorted(trained_by))}, which trained on it: skipped")
        return None
    feedback_version = None
    if fresh:
        trigger = "data"
        announced = [e.extra.get("data_version") for e in fresh if getattr(e, "extra", None)]
        data_version = data_version or next((v for v in reversed(announced) if v), None)
    elif assets.DRIFT in events:
        trigger = "drift"
        # Two runs may plan at once: one checks and starts the cooldown (and versions feedback) at a time.
        with file_lock(_state_file(settings).with_name(".retraining.lock"), timeout=900):
            left = in_cooldown(settings)
            if left is not None:
                print(f"drift retraining skipped: cooldown of {settings.retrain_cooldown_hours} h has {left} left")
                return None
            state = _load_state(settings)
            state["last_drift_retraining"] = datetime.now(UTC).isoformat()
            _save_state(state, settings)
            feedback_version = version_feedback(settings)
        print(f"feedback labels versioned as {feedback_version}" if feedback_version else "no new feedback labels")
    else:
        trigger = "manual"
    data_version = data_version or data_registry.latest_version(settings)
    if data_version is None:
        raise RuntimeError("the data registry has no data version yet; run ingest_data first")
    return {
        "trigger": trigger,
        "data_version": data_version,
        "needs_approval": trigger == "drift" and settings.require_approval,
        # only when retraining made one: the plan task announces it as a medops/data Asset event
        **({"new_data_version": feedback_version} if feedback_version else {}),
    }
