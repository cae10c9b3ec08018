"""Data and models the benchmarks run on, all derived from the seed so they look like clinical data.

Synthetic rows are seed rows drawn with replacement, each feature multiplied by ``1 + N(0, noise)``
and clipped to its plausible range, so rows are distinct (no duplicate rejections) and
distributions stay close to the seed's; ``shift`` scales chosen columns to make them drift.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from pipelines.schema import FEATURE_RANGES, FEATURES, LABEL, SITE

SITES = ("site-a", "site-b", "site-c", "site-d")
# Columns bench.drift shifts (x1.15): 6 of 30 is a share of 0.2, under the 0.3 dataset-drift threshold
# overall, so the verdict depends on the per-column tests being right, not just on a landslide.
DRIFTED_COLUMNS = ("mean_radius", "mean_texture", "mean_area", "worst_radius", "worst_texture", "worst_area")


def seed() -> pd.DataFrame:
    from pipelines.data import seed_frame

    return seed_frame()


def synthetic_rows(
    n: int,
    *,
    rng_seed: int = 0,
    noise: float = 0.02,
    shift: dict[str, float] | None = None,
    base: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """``n`` rows shaped like the seed (features, diagnosis, site_id over four sites)."""
    base = seed() if base is None else base
    rng = np.random.default_rng(rng_seed)
    picks = rng.integers(0, len(base), n)
    values = base[list(FEATURES)].to_numpy()[picks]
    values = values * (1.0 + rng.normal(0.0, noise, values.shape))
    for name, factor in (shift or {}).items():
        values[:, FEATURES.index(name)] *= factor
    low = np.array([FEATURE_RANGES[f][0] for f in FEATURES])
    high = np.array([FEATURE_RANGES[f][1] for f in FEATURES])
    values = np.clip(values, low, high)
    frame = pd.DataFrame(values, columns=list(FEATURES))
    frame[LABEL] = base[LABEL].to_numpy()[picks]
    frame[SITE] = np.asarray(SITES)[rng.integers(0, len(SITES), n)]
    return frame


def request_body(n_records: int) -> bytes:
    """A ``/predict`` body with ``n_records`` seed records, each with an encounter id."""
    rows = seed()[list(FEATURES)].head(n_records)
    records = [dict(row) | {"encounter_id": f"bench-{i:05d}"} for i, row in enumerate(rows.to_dict("records"))]
    if len(records) < n_records:
        raise ValueError(f"the seed has only {len(records)} rows")
    return json.dumps({"records": records}).encode()


def train_champion(settings: Any, families: list[str]) -> str:
    """Seed data registry, one training (the given families) and promotion; the @champion version."""
    from pipelines.data_registry import init_registry
    from pipelines.train import promote, train_model

    init_registry(settings)
    result = train_model(settings, families=families, trigger="bench")
    if not promote(result, settings):
        raise RuntimeError(f"the benchmark model did not pass the gate: {result.gate.reasons}")
    return result.model_version
