"""A simulated clinical application: realistic /predict traffic from one site, with optional shifts.

Records are resampled from the seed data with a little measurement noise and sent in batches with
unique encounter ids. The shifts are the ones monitoring must catch or the service must refuse:

- ``covariate``: the site's imaging is calibrated differently: lengths (radius, perimeter) read
  25% larger and areas accordingly (1.25² = 1.56 times).
- ``prevalence``: the site is a referral centre: 80% of its cases are malignant (37% in the seed).
- ``units``: a quarter of the records give radius and perimeter in micrometres instead of
  millimetres. The service answers 422 naming the fields; like a real app, the simulator resends
  the other records of the batch and counts the refused ones.

With ``feedback`` the true diagnoses go to ``/feedback`` afterwards, as a pathology report would.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    import pandas as pd

    from medops.core.settings import Settings
    from serving.client import MedopsClient
    from serving.contract import ErrorDetail, PredictResponse

Drift = Literal["covariate", "prevalence", "units"]
DRIFTS: tuple[str, ...] = ("covariate", "prevalence", "units")

LENGTH_FEATURES = ("mean_radius", "mean_perimeter", "worst_radius", "worst_perimeter",
                   "radius_error", "perimeter_error")  # fmt: skip
AREA_FEATURES = ("mean_area", "area_error", "worst_area")
COVARIATE_SCALE = 1.25
PREVALENCE_MALIGNANT = 0.8
UNITS_SHARE = 0.25
MICROMETRES_PER_MILLIMETRE = 1000.0
NOISE = 0.01  # relative measurement noise on every feature

_RECORD_INDEX = re.compile(r"records\[(\d+)\]")
T = TypeVar("T")


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
    low, high = np.array([FEATURE_RANGES[name] for name in features]).T
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
) -> SimulationSummary:
    """Send ``records`` cases from ``site`` to the service's /predict (and their labels to /feedback).

    The service is ``base_url`` (default: the local one) with ``api_key`` (default: the first of
    ``settings.service_api_keys()``). Raises :class:`SimulationError` with one readable line when
    the service cannot be used.
    """
    from medops.core.settings import get_settings
    from pipelines.schema import ENCOUNTER, FEATURES, LABEL, POSITIVE, SITE
    from serving.client import MedopsClient

    if records < 1:
        raise ValueError("records must be at least 1")
    settings = settings or get_settings()
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
    with MedopsClient(base_url, api_key) as service:
        with _progress(progress, records, f"{site}: /predict") as advance:
            for start in range(0, records, batch_size):
                batch = cases.iloc[start : start + batch_size]
                body = batch[payload_columns].to_dict(orient="records")
                accepted, answer, refused = _predict(service, body, reasons)
                summary.batches += 1
                summary.rejected += len(refused)
                if answer is not None:
                    for index, prediction in zip(accepted, answer.predictions, strict=False):
                        summary.scored += 1
                        summary.predicted_malignant += prediction.label == POSITIVE
                        scored_ids.append((body[index][ENCOUNTER], batch[LABEL].iloc[index]))
                    if answer.model_version:
                        versions.add(answer.model_version)
                advance(len(body))
        if feedback and scored_ids:
            with _progress(progress, len(scored_ids), f"{site}: /feedback") as advance:
                for start in range(0, len(scored_ids), batch_size):
                    chunk = scored_ids[start : start + batch_size]
                    recorded = _call(service, "/feedback", service.feedback, chunk)
                    summary.feedback_sent += recorded.recorded
                    advance(len(chunk))
    summary.model_versions = sorted(versions)
    summary.rejection_reasons = dict(reasons.most_common(5))
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _predict(
    service: MedopsClient, body: list[dict[str, Any]], reasons: Counter[str]
) -> tuple[list[int], PredictResponse | None, list[int]]:
    """Score one batch; on 422 drop the records the service named and send the rest once more.

    Returns the positions (in ``body``) that were scored, the response, and the refused positions.
    """
    from serving.client import ServiceError

    pending = list(range(len(body)))
    refused: list[int] = []
    while pending:  # each round drops at least one record, so this ends
        try:
            answer = _call(service, "/predict", service.predict, [body[i] for i in pending], refusals=True)
            return pending, answer, refused
        except ServiceError as error:
            for item in error.detail:
                reasons[_reason_key(item)] += 1
            named = {int(m.group(1)) for item in error.detail if (m := _RECORD_INDEX.match(item.field))}
            named &= set(range(len(pending)))
            if not named:  # nothing tells good records from bad ones: the whole batch is refused
                if not error.detail:
                    reasons[error.message[:80]] += 1
                return [], None, refused + pending
            refused += [pending[i] for i in sorted(named)]
            pending = [index for i, index in enumerate(pending) if i not in named]
    return [], None, refused


def _reason_key(item: ErrorDetail) -> str:
    return f"{_RECORD_INDEX.sub('records[*]', item.field)}: {item.reason.split(':')[0]}"


def _call(service: MedopsClient, path: str, call: Callable[..., T], *args: Any, refusals: bool = False) -> T:
    """``call(*args)``, with the service's failures as one-line :class:`SimulationError` messages.

    With ``refusals`` a 422 is handed back to the caller as the :class:`ServiceError` it is.
    """
    import httpx
    from pydantic import ValidationError

    from serving.client import ServiceError

    try:
        return call(*args)
    except httpx.TransportError as error:
        raise SimulationError(
            f"cannot reach the service at {service.url} ({error}); is it running (make run)?"
        ) from None
    except ServiceError as error:
        where = f"{service.url}{path}"
        if refusals and error.status == 422:
            raise
        if error.status == 401:
            raise SimulationError(f"{where} refused the API key (401): check MEDOPS_API_KEYS") from None
        raise SimulationError(f"{where} answered HTTP {error.status}: {error.message[:200]}") from None
    except ValidationError as error:
        raise SimulationError(f"{service.url}{path} answered outside the contract: {str(error)[:200]}") from None


@contextmanager
def _progress(enabled: bool, total: int, description: str) -> Iterator[Callable[[int], object]]:
    """A rich progress bar on stderr (or nothing), used as ``with _progress(...) as advance``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
