"""A simulated clinical application: realistic /predict traffic from one site, with optional shifts.

Records are resampled from the Wisconsin breast cancer data (scikit-learn's copy, with medops'
snake_case columns and malignant spelled out), with a little measurement noise, and sent in
batches with unique encounter ids. The shifts are the ones monitoring must catch or the service
must refuse:

- ``covariate``: the site's imaging is calibrated differently: lengths (radius, perimeter) read
  25% larger and areas accordingly (1.25² = 1.56 times).
- ``prevalence``: the site is a referral centre: 80% of its cases are malignant (37% in the seed).
- ``units``: a quarter of the records give radius and perimeter in micrometres instead of
  millimetres. The service answers 422 naming the fields; like a real app, the simulator resends
  the other records of the batch and counts the refused ones.

With ``feedback`` the true diagnoses of the scored records go to ``/feedback`` afterwards, as a
pathology report would, so monitoring can measure performance.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import httpx
    import pandas as pd

    from medops.core.settings import Settings

Drift = Literal["covariate", "prevalence", "units"]
DRIFTS: tuple[str, ...] = ("covariate", "prevalence", "units")

LENGTH_FEATURES = tuple(f"{part}_{kind}" for part in ("mean", "worst") for kind in ("radius", "perimeter")) + (
    "radius_error",
    "perimeter_error",
)
AREA_FEATURES = ("mean_area", "area_error", "worst_area")
COVARIATE_SCALE = 1.25
PREVALENCE_MALIGNANT = 0.8
UNITS_SHARE = 0.25
MICROMETRES_PER_MILLIMETRE = 1000.0
NOISE = 0.01  # relative measurement noise on every feature

_RECORD_INDEX = re.compile(r"records\[(\d+)\]")


class SimulationError(RuntimeError):
    """The service could not be used (down, wrong key, unexpected answer): one line for the terminal."""


@dataclass
class SimulationSummary:
    """What one simulated session sent and what the service made of it."""

    site: str
    drift: str | None
    records: int = 0
    scored: int = 0
    rejected: int = 0
    predicted_malignant: int = 0
    feedback_sent: int = 0
    batches: int = 0
    model_versions: list[str] = field(default_factory=list)
    rejection_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def traffic(site: str, records: int, drift: str | None = None, *, seed: int | None = None) -> pd.DataFrame:
    """``records`` realistic cases from ``site``: the 30 features, ``diagnosis`` and a unique ``encounter_id``."""
    import numpy as np

    from pipelines.data import seed_frame
    from pipelines.schema import ENCOUNTER, FEATURE_RANGES, FEATURES, LABEL, POSITIVE, SITE

    if drift not in (None, *DRIFTS):
        raise ValueError(f"unknown drift {drift!r}; choose from {', '.join(DRIFTS)}")
    rng = np.random.default_rng(seed)
    pool = seed_frame()
    if drift == "prevalence":
        malignant = (pool[LABEL] == POSITIVE).to_numpy()
        share = np.where(malignant, PREVALENCE_MALIGNANT, 1 - PREVALENCE_MALIGNANT)
        weights = share / np.where(malignant, malignant.sum(), (~malignant).sum())
        rows = rng.choice(len(pool), size=records, p=weights)
    else:
        rows = rng.integers(0, len(pool), size=records)
    frame = pool.iloc[rows].reset_index(drop=True)
    features = list(FEATURES)
    values = frame[features].to_numpy() * rng.normal(1.0, NOISE, size=(records, len(features)))
    if drift == "covariate":
        lengths = {name: COVARIATE_SCALE for name in LENGTH_FEATURES}
        areas = {name: COVARIATE_SCALE**2 for name in AREA_FEATURES}
        values *= np.array([(lengths | areas).get(name, 1.0) for name in features])
    # Noise never pushes a real measurement out of the plausible range; wrong units must.
    low = np.array([FEATURE_RANGES[name][0] for name in features])
    high = np.array([FEATURE_RANGES[name][1] for name in features])
    values = np.clip(values, low, high)
    if drift == "units":
        wrong = rng.random(records) < UNITS_SHARE
        columns = [features.index(name) for name in LENGTH_FEATURES]
        values[np.ix_(wrong, columns)] *= MICROMETRES_PER_MILLIMETRE
    frame[features] = np.round(values, 6)
    session = uuid.uuid4().hex[:8]
    frame[ENCOUNTER] = [f"sim-{site}-{session}-{i:07d}" for i in range(records)]
    frame[SITE] = site
    return frame


def simulate(
    site: str,
    records: int,
    drift: str | None = None,
    feedback: bool = False,
    settings: Settings | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    *,
    batch_size: int = 50,
    seed: int | None = None,
    progress: bool = True,
    client: httpx.Client | None = None,
) -> SimulationSummary:
    """Send ``records`` cases from ``site`` to the service's /predict (and their labels to /feedback).

    The service is ``base_url`` (default ``http://127.0.0.1:<MEDOPS_SERVING_PORT>``) with bearer
    ``api_key`` (default the first of ``settings.service_api_keys()``). Raises
    :class:`SimulationError` with one readable line when the service cannot be used.
    """
    import httpx

    from pipelines.schema import ENCOUNTER, FEATURES, LABEL, POSITIVE, SITE

    if records < 1:
        raise ValueError("records must be at least 1")
    if settings is None:
        from medops.core.settings import get_settings

        settings = get_settings()
    base_url = (base_url or f"http://{settings.host}:{settings.serving_port}").rstrip("/")
    api_key = api_key or settings.service_api_keys()[0]
    batch_size = max(1, min(batch_size, settings.max_records))
    cases = traffic(site, records, drift, seed=seed)
    summary = SimulationSummary(site=site, drift=drift, records=records)
    versions: set[str] = set()
    reasons: Counter[str] = Counter()
    scored_ids: list[tuple[str, str]] = []
    payload_columns = [*FEATURES, ENCOUNTER, SITE]
    started = time.perf_counter()
    own_client = client is None
    http = client or httpx.Client(base_url=base_url, timeout=30.0)
    http.headers["Authorization"] = f"Bearer {api_key}"
    try:
        with _progress(progress, records, f"{site}: /predict") as advance:
            for start in range(0, records, batch_size):
                batch = cases.iloc[start : start + batch_size]
                body = batch[payload_columns].to_dict(orient="records")
                accepted, predictions, refused = _predict(http, base_url, body, reasons)
                summary.batches += 1
                summary.rejected += len(refused)
                for index, prediction in zip(accepted, predictions.get("predictions", []), strict=False):
                    summary.scored += 1
                    summary.predicted_malignant += prediction.get("label") == POSITIVE
                    scored_ids.append((body[index][ENCOUNTER], batch[LABEL].iloc[index]))
                if predictions.get("model_version"):
                    versions.add(str(predictions["model_version"]))
                advance(len(body))
        if feedback and scored_ids:
            with _progress(progress, len(scored_ids), f"{site}: /feedback") as advance:
                for start in range(0, len(scored_ids), batch_size):
                    chunk = scored_ids[start : start + batch_size]
                    labels = [{"encounter_id": encounter, "diagnosis": truth} for encounter, truth in chunk]
                    answer = _post(http, base_url, "/feedback", {"labels": labels})
                    _raise_for_status(answer, base_url, "/feedback")
                    summary.feedback_sent += int(answer.json().get("recorded", len(chunk)))
                    advance(len(chunk))
    finally:
        if own_client:
            http.close()
    summary.model_versions = sorted(versions)
    summary.rejection_reasons = dict(reasons.most_common(5))
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _predict(
    http: httpx.Client, base_url: str, body: list[dict[str, Any]], reasons: Counter[str]
) -> tuple[list[int], dict[str, Any], list[int]]:
    """Score one batch; on 422 drop the records the service named and send the rest once more.

    Returns the positions (in ``body``) that were scored, the response, and the refused positions.
    """
    pending = list(range(len(body)))
    refused: list[int] = []
    while pending:  # each round drops at least one record, so this ends
        answer = _post(http, base_url, "/predict", {"records": [body[i] for i in pending]})
        if answer.status_code != 422:
            _raise_for_status(answer, base_url, "/predict")
            return pending, answer.json(), refused
        detail = _error_detail(answer)
        for item in detail:
            reasons[_reason_key(item)] += 1
        named = {int(m.group(1)) for item in detail if (m := _RECORD_INDEX.match(str(item.get("field", ""))))}
        named &= set(range(len(pending)))
        if not named:  # nothing tells good records from bad ones: the whole batch is refused
            if not detail:
                reasons[_error_message(answer)[:80]] += 1
            return [], {}, refused + pending
        refused += [pending[i] for i in sorted(named)]
        pending = [index for i, index in enumerate(pending) if i not in named]
    return [], {}, refused


def _reason_key(item: dict[str, Any]) -> str:
    field_name = _RECORD_INDEX.sub("records[*]", str(item.get("field", "?")))
    return f"{field_name}: {str(item.get('reason', 'invalid')).split(':')[0]}"


def _error_detail(answer: httpx.Response) -> list[dict[str, Any]]:
    try:
        detail = answer.json().get("detail")
    except (ValueError, AttributeError):
        return []
    return [item for item in detail if isinstance(item, dict)] if isinstance(detail, list) else []


def _error_message(answer: httpx.Response) -> str:
    try:
        return str(answer.json().get("error") or answer.text)
    except (ValueError, AttributeError):
        return answer.text


def _post(http: httpx.Client, base_url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    import httpx

    try:
        return http.post(path, json=body)
    except httpx.TransportError as error:
        raise SimulationError(f"cannot reach the service at {base_url} ({error}); is it running (make run)?") from None


def _raise_for_status(answer: httpx.Response, base_url: str, path: str) -> None:
    if answer.status_code < 300:
        return
    if answer.status_code == 401:
        raise SimulationError(f"{base_url}{path} refused the API key (401): check MEDOPS_API_KEYS")
    raise SimulationError(f"{base_url}{path} answered HTTP {answer.status_code}: {_error_message(answer)[:200]}")


class _progress:
    """A rich progress bar on stderr (or nothing), used as ``with _progress(...) as advance``."""

    def __init__(self, enabled: bool, total: int, description: str):
        self.enabled, self.total, self.description = enabled, total, description

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()
