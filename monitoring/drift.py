"""Drift of what the service receives against the champion's training rows: a verdict and the Evidently result.

:func:`detect_drift` is the one entry point. It returns a :class:`DriftResult` whose verdict is
``no_drift``, ``drift`` or ``insufficient_data`` (fewer than ``settings.drift_min_rows`` current
rows: never an alert), the per-column tests, prediction drift on ``probability_malignant``,
classification performance where feedback labels exist, a per-``site_id`` breakdown and the
Evidently snapshots people open as HTML/JSON.

How it stays fast on large windows (a million rows is a few seconds, Evidently's own
``DataDriftPreset`` takes about 40 s): the verdict does not come from Evidently's report. It runs
*the tests Evidently would choose* (same selection rule, same thresholds, same scipy formulas),
vectorised over sorted columns:

- reference of at most 1,000 rows: two-sample Kolmogorov-Smirnov. The statistic is computed from
  the counts of current values at or below each distinct reference value (current values are
  sorted once per site, so the overall counts are sums of the per-site counts) and is the exact
  value scipy's ``ks_2samp`` finds; the p-value uses scipy's own choice (exact test for samples
  of at most 10,000 rows, done by calling ``ks_2samp`` itself, else Smirnov's asymptotic
  distribution ``kstwo``, as ``ks_2samp`` does).
- larger reference: Wasserstein distance normed by the reference's standard deviation, integrated
  over the merged sorted samples exactly as ``scipy.stats.wasserstein_distance`` does.
- columns with five or fewer distinct values: Evidently's own test function (never the case for
  the thirty continuous features, kept so the rule matches Evidently's everywhere).

So verdicts and drifted columns equal a plain Evidently run on all rows, up to floating-point
rounding of the scores. The Evidently report itself runs on a seeded sample stratified by site of
at most ``report_rows`` current rows (all rows for ordinary hourly windows); its metadata says so,
and the authoritative numbers are those of the result (written as ``summary.json``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.schema import FEATURES, LABEL, NEGATIVE, POSITIVE, SITE

if TYPE_CHECKING:
    from evidently.core.report import Snapshot

    from medops.settings import Settings

PROBABILITY = "probability_malignant"
PREDICTED_LABEL = "label"
ENCOUNTER_HASH = "encounter_hash"
UNKNOWN_SITE = "unknown"

REPORT_ROWS = 20_000
"""Most current rows the Evidently report itself is computed on (a seeded sample above that)."""

# Evidently's default test selection (evidently.legacy.calculations.stattests.registry).
_SMALL_REFERENCE_ROWS = 1_000
_FEW_VALUES = 5
# scipy.stats.ks_2samp(method="auto") is exact up to this many rows in either sample.
_KS_EXACT_MAX_ROWS = 10_000


class Verdict(StrEnum):
    NO_DRIFT = "no_drift"
    DRIFT = "drift"
    INSUFFICIENT_DATA = "insufficient_data"


@dataclass(frozen=True)
class ColumnDrift:
    """One column's drift test, named and thresholded as Evidently names and thresholds it."""

    column: str
    test: str
    score: float
    threshold: float
    drifted: bool


@dataclass(frozen=True)
class SiteDrift:
    """The verdict for the rows one site sent (``insufficient_data`` below ``drift_min_rows``)."""

    site: str
    n_rows: int
    verdict: Verdict
    drifted_columns: tuple[str, ...] = ()
    share: float = 0.0


@dataclass(frozen=True)
class Performance:
    """Classification quality on predictions whose true diagnosis came back through /feedback."""

    n_labelled: int
    n_malignant: int
    accuracy: float
    sensitivity: float | None
    specificity: float | None
    precision: float | None
    roc_auc: float | None


@dataclass
class DriftResult:
    """What :func:`detect_drift` found; ``summary()`` is the JSON-able part, snapshots are Evidently's."""

    verdict: Verdict
    drifted_columns: tuple[str, ...]
    share: float
    share_threshold: float
    n_current: int
    n_reference: int
    columns: dict[str, ColumnDrift] = field(default_factory=dict)
    prediction_drift: ColumnDrift | None = None
    performance: Performance | None = None
    per_site: dict[str, SiteDrift] = field(default_factory=dict)
    report_rows: int = 0
    drift_snapshot: Snapshot | None = field(default=None, repr=False)
    performance_snapshot: Snapshot | None = field(default=None, repr=False)

    @property
    def drifted_sites(self) -> tuple[str, ...]:
        return tuple(site for site, found in self.per_site.items() if found.verdict == Verdict.DRIFT)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("drift_snapshot", "performance_snapshot"):
            data.pop(name)
        data["drifted_sites"] = list(self.drifted_sites)
        return _plain(data)


def _plain(value: Any) -> Any:
    """JSON-ready copy: enums to strings, tuples to lists, numpy scalars to Python numbers."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, StrEnum):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def detect_drift(
    current: pd.DataFrame,
    reference: pd.DataFrame,
    settings: Settings,
    *,
    reference_probabilities: Sequence[float] | np.ndarray | pd.Series | None = None,
    feedback: pd.DataFrame | None = None,
    columns: Sequence[str] = FEATURES,
    report: bool = True,
    report_rows: int = REPORT_ROWS,
) -> DriftResult:
    """Compare a prediction-log window (``current``) with the champion's training rows (``reference``).

    ``current`` has the prediction log's columns (the 30 features, ``site_id``,
    ``probability_malignant``, ``label``, ``encounter_hash``...); ``reference`` has the features
    and, optionally, ``probability_malignant`` from scoring its rows with the champion (or pass
    ``reference_probabilities``). ``feedback`` (``encounter_hash``, ``diagnosis``) is joined to
    the predictions for performance. The verdict is ``drift`` when the share of drifted feature
    columns reaches ``settings.drift_share_threshold`` (Evidently's dataset-drift rule); below
    ``settings.drift_min_rows`` current rows it is ``insufficient_data`` and nothing is tested.
    Each site with at least ``drift_min_rows`` rows gets its own verdict the same way.
    """
    if reference.empty:
        raise ValueError("the reference frame is empty: nothing to compare the prediction log with")
    columns = [name for name in columns if name in current.columns and name in reference.columns]
    if not columns:
        raise ValueError("current and reference share none of the feature columns")
    if reference_probabilities is not None:
        reference = reference.assign(**{PROBABILITY: np.asarray(reference_probabilities, dtype="float64")})
    threshold = settings.drift_share_threshold
    min_rows = settings.drift_min_rows
    n_current = len(current)
    result = DriftResult(
        verdict=Verdict.INSUFFICIENT_DATA,
        drifted_columns=(),
        share=0.0,
        share_threshold=threshold,
        n_current=n_current,
        n_reference=len(reference),
    )
    sites = _SiteGroups.of(current)
    if n_current < min_rows:
        result.per_site = {
            name: SiteDrift(name, size, Verdict.INSUFFICIENT_DATA) for name, size in sites.sizes().items()
        }
        return result

    tested = list(columns)
    with_prediction = PROBABILITY in current.columns and PROBABILITY in reference.columns
    if with_prediction:
        tested.append(PROBABILITY)
    overall, by_site = _test_columns(current, reference, tested, sites)

    result.columns = {name: overall[name] for name in columns if name in overall}
    result.prediction_drift = overall.get(PROBABILITY)
    result.verdict, result.drifted_columns, result.share = _verdict(result.columns.values(), threshold)
    for index, (name, size) in enumerate(sites.sizes().items()):
        if size < min_rows:
            result.per_site[name] = SiteDrift(name, size, Verdict.INSUFFICIENT_DATA)
            continue
        site_columns = [by_site[column][index] for column in columns if column in by_site]
        verdict, drifted, share = _verdict([found for found in site_columns if found], threshold)
        result.per_site[name] = SiteDrift(name, size, verdict, drifted, share)

    labelled = label_predictions(current, feedback) if feedback is not None else None
    if labelled is not None and len(labelled):
        result.performance = classification_performance(labelled)
    if report:
        result.report_rows = min(n_current, report_rows)
        sample = _report_sample(current, sites, report_rows, settings.seed)
        result.drift_snapshot = _drift_snapshot(sample, reference, columns, with_prediction, result)
        if labelled is not None and len(labelled):
            result.performance_snapshot = _performance_snapshot(labelled)
    return result


def _verdict(found: Any, threshold: float) -> tuple[Verdict, tuple[str, ...], float]:
    found = list(found)
    drifted = tuple(column.column for column in found if column.drifted)
    share = len(drifted) / len(found) if found else 0.0
    return (Verdict.DRIFT if found and share >= threshold else Verdict.NO_DRIFT), drifted, share


# Sites ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SiteGroups:
    """Row positions of the current window grouped by ``site_id`` (one group when there is none)."""

    names: tuple[str, ...]
    order: np.ndarray | None  # positions sorted by site, stable; None: one group in row order
    bounds: np.ndarray  # group i is order[bounds[i]:bounds[i + 1]]

    @classmethod
    def of(cls, frame: pd.DataFrame) -> _SiteGroups:
        if SITE not in frame.columns or frame.empty:
            return cls((), None, np.array([0, len(frame)]))
        codes, uniques = pd.factorize(frame[SITE], use_na_sentinel=False)
        names = tuple(UNKNOWN_SITE if pd.isna(name) else str(name) for name in uniques)
        counts = np.bincount(codes, minlength=len(names))
        bounds = np.concatenate(([0], np.cumsum(counts)))
        order = None if len(names) == 1 else np.argsort(codes, kind="stable")
        return cls(names, order, bounds)

    def sizes(self) -> dict[str, int]:
        return {name: int(self.bounds[i + 1] - self.bounds[i]) for i, name in enumerate(self.names)}

    def runs(self, values: np.ndarray) -> list[np.ndarray]:
        """``values`` split by site, each part sorted with NaN and infinities dropped (as Evidently does)."""
        grouped = values if self.order is None else values[self.order]
        parts = [np.sort(grouped[self.bounds[i] : self.bounds[i + 1]]) for i in range(len(self.bounds) - 1)]
        return [_finite_sorted(part) for part in parts]


def _finite_sorted(values: np.ndarray) -> np.ndarray:
    # np.sort puts -inf first and +inf then NaN last.
    low = np.searchsorted(values, -np.inf, side="right")
    high = np.searchsorted(values, np.inf, side="left")
    return values[low:high]


# Column tests -----------------------------------------------------------------------------------
class _Sorted:
    """A column's current values as sorted runs (one per site): counts are sums over the runs."""

    def __init__(self, runs: list[np.ndarray]):
        self.runs = runs
        self.n = sum(len(run) for run in runs)

    def count_le(self, points: np.ndarray) -> np.ndarray:
        return sum((np.searchsorted(run, points, side="right") for run in self.runs), np.zeros(len(points), int))

    def count_lt(self, points: np.ndarray) -> np.ndarray:
        return sum((np.searchsorted(run, points, side="left") for run in self.runs), np.zeros(len(points), int))

    def values(self) -> np.ndarray:
        return self.runs[0] if len(self.runs) == 1 else np.concatenate(self.runs)

    def merged_with(self, reference_sorted: np.ndarray) -> np.ndarray:
        # Stable sort is a timsort: merging already sorted runs is close to linear.
        return np.sort(np.concatenate([reference_sorted, *self.runs]), kind="stable")


def _test_columns(
    current: pd.DataFrame, reference: pd.DataFrame, columns: list[str], sites: _SiteGroups
) -> tuple[dict[str, ColumnDrift], dict[str, list[ColumnDrift | None]]]:
    """Every column tested on all rows and per site; columns in parallel (numpy sorts release the GIL)."""

    def one(name: str) -> tuple[ColumnDrift | None, list[ColumnDrift | None]]:
        ref = reference[name].to_numpy(dtype="float64")
        ref_sorted = _finite_sorted(np.sort(ref))
        runs = sites.runs(current[name].to_numpy(dtype="float64"))
        overall = _column_test(name, ref_sorted, _Sorted(runs))
        per_site = [_column_test(name, ref_sorted, _Sorted([run])) for run in runs] if len(runs) > 1 else []
        return overall, per_site or [overall]

    import evidently.legacy.calculations.stattests  # noqa: F401  (import once, before the threads)
    import scipy.stats  # noqa: F401

    workers = max(1, min(len(columns), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="drift") as pool:
        found = dict(zip(columns, pool.map(one, columns), strict=True))
    overall = {name: column for name, (column, _) in found.items() if column is not None}
    return overall, {name: per_site for name, (_, per_site) in found.items()}


def _column_test(name: str, ref_sorted: np.ndarray, cur: _Sorted) -> ColumnDrift | None:
    """The test Evidently picks for a numerical column, computed on sorted values."""
    from evidently.legacy.calculations.stattests import ks_stat_test, wasserstein_stat_test

    n_ref, n_cur = len(ref_sorted), cur.n
    if n_ref == 0 or n_cur == 0:
        return None  # Evidently refuses empty columns; a column with no values has nothing to test
    if _few_values(ref_sorted, cur):
        return _evidently_test(name, ref_sorted, cur.values())
    if n_ref <= _SMALL_REFERENCE_ROWS:
        threshold = ks_stat_test.default_threshold
        p_value = _ks_p_value(ref_sorted, cur)
        return ColumnDrift(name, ks_stat_test.name, p_value, threshold, p_value <= threshold)
    threshold = wasserstein_stat_test.default_threshold
    distance = _wasserstein_normed(ref_sorted, cur)
    return ColumnDrift(name, wasserstein_stat_test.name, distance, threshold, distance >= threshold)


def _few_values(ref_sorted: np.ndarray, cur: _Sorted) -> bool:
    ref_values = np.unique(ref_sorted)
    if len(ref_values) > _FEW_VALUES:
        return False
    seen = set(ref_values.tolist())
    for run in cur.runs:
        distinct = run[np.concatenate(([True], run[1:] != run[:-1]))] if len(run) else run
        seen.update(distinct[: _FEW_VALUES + 1].tolist())
        if len(seen) > _FEW_VALUES:
            return False
    return True


def _evidently_test(name: str, ref: np.ndarray, cur: np.ndarray) -> ColumnDrift:
    from evidently.legacy.calculations.stattests import get_stattest
    from evidently.legacy.core import ColumnType

    reference, current = pd.Series(ref), pd.Series(cur)
    test = get_stattest(reference, current, ColumnType.Numerical, None)
    found = test(reference, current, ColumnType.Numerical, None)
    return ColumnDrift(name, test.name, float(found.drift_score), found.actual_threshold, bool(found.drifted))


def _ks_p_value(ref_sorted: np.ndarray, cur: _Sorted) -> float:
    """p-value of scipy's two-sided ``ks_2samp(reference, current)`` without sorting the pooled sample."""
    from scipy import stats

    n1, n2 = len(ref_sorted), cur.n
    if max(n1, n2) <= _KS_EXACT_MAX_ROWS:
        return float(stats.ks_2samp(ref_sorted, cur.values()).pvalue)
    # Both empirical CDFs are step functions; the largest gap is reached at a reference value
    # (reference above current) or just before the next one (current above reference).
    points = np.unique(ref_sorted)
    ref_le = np.searchsorted(ref_sorted, points, side="right")
    above = np.max(ref_le / n1 - cur.count_le(points) / n2)
    cur_before_next = np.concatenate((cur.count_lt(points), [n2]))
    ref_before_next = np.concatenate(([0], ref_le))
    below = np.clip(np.max(cur_before_next / n2 - ref_before_next / n1), 0, 1)
    statistic = below if below > above else above
    m, n = sorted([float(n1), float(n2)], reverse=True)
    effective = m * n / (m + n)
    return float(np.clip(stats.kstwo.sf(statistic, np.round(effective)), 0, 1))


def _wasserstein_normed(ref_sorted: np.ndarray, cur: _Sorted) -> float:
    """Evidently's ``wasserstein`` score: scipy's ``wasserstein_distance`` divided by the reference's std."""
    n1, n2 = len(ref_sorted), cur.n
    pooled = cur.merged_with(ref_sorted)
    # Place each reference value before equal current values; where the pooled sample steps up
    # (the only places that weigh in the integral) the running counts are then both exact.
    is_reference = np.zeros(len(pooled), dtype=np.int8)
    is_reference[np.arange(n1) + cur.count_lt(ref_sorted)] = 1
    ref_count = np.cumsum(is_reference[:-1], dtype=np.int64)
    cur_count = np.arange(1, len(pooled), dtype=np.int64) - ref_count
    distance = float(np.dot(np.abs(ref_count / n1 - cur_count / n2), np.diff(pooled)))
    return distance / max(float(np.std(ref_sorted)), 0.001)


# Performance ------------------------------------------------------------------------------------
def label_predictions(current: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """Predictions whose true diagnosis came back, joined on the keyed encounter hash.

    The latest label per encounter counts (a correction replaces the first answer), and the latest
    prediction per encounter if it was scored more than once.
    """
    needed = {ENCOUNTER_HASH, PROBABILITY}
    if feedback is None or feedback.empty or not needed <= set(current.columns):
        return pd.DataFrame(columns=[PROBABILITY, PREDICTED_LABEL, LABEL, SITE])
    labels = feedback.dropna(subset=[ENCOUNTER_HASH, LABEL])
    if "logged_at" in labels.columns:
        labels = labels.sort_values("logged_at", kind="stable")
    labels = labels.drop_duplicates(ENCOUNTER_HASH, keep="last")[[ENCOUNTER_HASH, LABEL]]
    keep = [ENCOUNTER_HASH, PROBABILITY] + [c for c in (PREDICTED_LABEL, SITE) if c in current.columns]
    has_encounter = current[ENCOUNTER_HASH].fillna("").astype(str) != ""  # "" where no encounter id was sent
    predictions = current.loc[has_encounter, keep]
    predictions = predictions.drop_duplicates(ENCOUNTER_HASH, keep="last")
    labelled = predictions.merge(labels, on=ENCOUNTER_HASH, how="inner", suffixes=("", "_true"))
    labelled = labelled[labelled[LABEL].isin([POSITIVE, NEGATIVE])]
    if PREDICTED_LABEL not in labelled.columns:
        labelled[PREDICTED_LABEL] = np.where(labelled[PROBABILITY] >= 0.5, POSITIVE, NEGATIVE)
    # The hash is a patient identifier as far as reports go: it stops here.
    return labelled.drop(columns=[ENCOUNTER_HASH]).reset_index(drop=True)


def classification_performance(labelled: pd.DataFrame) -> Performance:
    """Accuracy, sensitivity and specificity for malignant, precision and ROC AUC of labelled predictions."""
    from scipy.stats import rankdata

    truth = (labelled[LABEL] == POSITIVE).to_numpy()
    predicted = (labelled[PREDICTED_LABEL] == POSITIVE).to_numpy()
    scores = labelled[PROBABILITY].to_numpy(dtype="float64")
    positives, negatives = int(truth.sum()), int((~truth).sum())
    true_pos = int((truth & predicted).sum())
    true_neg = int((~truth & ~predicted).sum())

    def ratio(num: int, den: int) -> float | None:
        return num / den if den else None

    roc_auc = None
    if positives and negatives:  # Mann-Whitney U over ranks, ties counted half
        ranks = rankdata(scores)
        roc_auc = (ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    return Performance(
        n_labelled=len(labelled),
        n_malignant=positives,
        accuracy=(true_pos + true_neg) / len(labelled),
        sensitivity=ratio(true_pos, positives),
        specificity=ratio(true_neg, negatives),
        precision=ratio(true_pos, int(predicted.sum())),
        roc_auc=None if roc_auc is None else float(roc_auc),
    )


# Evidently reports ------------------------------------------------------------------------------
def _report_sample(current: pd.DataFrame, sites: _SiteGroups, rows: int, seed: int) -> pd.DataFrame:
    """All rows, or a seeded sample of about ``rows`` rows with each site in its own proportion."""
    if len(current) <= rows:
        return current
    rng = np.random.default_rng(seed)
    picked = []
    for i in range(len(sites.bounds) - 1):
        start, stop = int(sites.bounds[i]), int(sites.bounds[i + 1])
        take = max(1, math.floor(rows * (stop - start) / len(current)))
        chosen = rng.choice(stop - start, size=min(take, stop - start), replace=False) + start
        picked.append(chosen if sites.order is None else sites.order[chosen])
    return current.iloc[np.sort(np.concatenate(picked))]


def _drift_snapshot(
    sample: pd.DataFrame,
    reference: pd.DataFrame,
    columns: list[str],
    with_prediction: bool,
    result: DriftResult,
) -> Snapshot:
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    numeric = columns + ([PROBABILITY] if with_prediction else [])
    definition = DataDefinition(numerical_columns=numeric)
    metrics: list[Any] = [DataDriftPreset(columns=columns, drift_share=result.share_threshold)]
    if with_prediction:
        metrics.append(ValueDrift(column=PROBABILITY))
    metadata = {
        "verdict": str(result.verdict),
        "rows_current": str(result.n_current),
        "rows_in_report": str(len(sample)),
        "note": (
            "Verdict and per-column tests in summary.json use every row of the window; "
            f"this report uses {len(sample)} of {result.n_current} rows (seeded, stratified by site)."
        ),
    }
    # Only model inputs and outputs go to Evidently: no encounter hash, request id or site.
    return Report(metrics, metadata=metadata, tags=["drift", str(result.verdict)]).run(
        Dataset.from_pandas(sample[numeric].reset_index(drop=True), data_definition=definition),
        Dataset.from_pandas(reference[numeric].reset_index(drop=True), data_definition=definition),
    )


def _performance_snapshot(labelled: pd.DataFrame) -> Snapshot:
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.presets import ClassificationPreset

    # Labels as served, not Evidently's own 0.5 cut of the probability: the model's operating
    # point is tuned for sensitivity, and the report must show what clinicians were told.
    definition = DataDefinition(
        classification=[BinaryClassification(target=LABEL, prediction_labels=PREDICTED_LABEL, pos_label=POSITIVE)],
        categorical_columns=[LABEL, PREDICTED_LABEL],
    )
    frame = labelled[[LABEL, PREDICTED_LABEL]].reset_index(drop=True)
    return Report([ClassificationPreset()], tags=["performance"]).run(
        Dataset.from_pandas(frame, data_definition=definition), None
    )
