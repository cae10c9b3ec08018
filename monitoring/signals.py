"""The signals a monitoring verdict is built from, for the whole window and for each site.

:func:`compute_signals` computes every :class:`Signal` of a prediction-log window (the verdict
it points to, whether it fired, at which severity, its figures and one line for people);
:mod:`monitoring.judge` turns them into verdicts.

- ``prediction_drift``: the champion's ``probability_malignant`` in the window vs its scores on
  the reference rows (Evidently's K-S test, strict threshold). Enough on its own for ``drift``.
- ``important_feature_drift``: the importance-weighted share of drifted features. A feature
  counts as drifted when Evidently's per-column test says so *and* it moved materially (normed
  Wasserstein distance of at least ``monitor_material_shift``): on large windows a K-S test
  notices differences far too small to matter, such as those between any two hospitals.
- ``top_feature_drift``: one of the ``monitor_top_features`` most important features drifted
  strongly (a far smaller p-value than Evidently's 0.05, and a material shift).
- ``top_feature_mean_shift``: the means of the ``monitor_top_features`` most important features
  moved together (Hotelling's two-sample T², p-value at or below ``monitor_top_shift_p_value``)
  by at least ``monitor_top_shift_distance`` (Mahalanobis distance, reference covariance):
  several small shifts in what the model relies on, none strong alone.
- ``column_share_drift``: Evidently's dataset rule (share of drifted columns, materially, at
  least ``drift_share_threshold``), kept as a ``warning``: it cannot tell features the model
  relies on from features it ignores.
- ``estimated_performance``: CBPE (:mod:`monitoring.estimation`); estimated sensitivity below
  the gate's ``min_sensitivity`` is a ``performance_drop`` (``critical`` when confidently below).
- ``realized_performance``: sensitivity and specificity of the latest ``monitor_label_window``
  labelled predictions, Wilson intervals; an upper bound below the gate's minimum is ``critical``.
- ``refusal_rate``: records the service refused (422) per site; a jump above the site's baseline
  is ``data_quality``, naming the fields.

Sites below ``monitor_site_min_rows`` scored rows get no drift or estimate signals of their own
(they still count in the window's), but their refusals and labels are judged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from monitoring.drift import PREDICTED_LABEL, PROBABILITY, ColumnDrift, plain
from pipelines.schema import LABEL, POSITIVE, SITE

if TYPE_CHECKING:
    from medops.core.settings import Settings
    from monitoring.estimation import PerformanceEstimate, PerformanceEstimator

WINDOW = "window"
"""Scope name of signals computed on the whole window (sites are named by their ``site_id``)."""
_WHOLE = "\x00window"  # internal key of the whole window where sites share a dict (no site id starts so)


class Severity(StrEnum):
    WARNING = "warning"
    CRITICAL = "critical"


class Points(StrEnum):
    """The verdict a fired signal points to."""

    DRIFT = "drift"
    PERFORMANCE_DROP = "performance_drop"
    DATA_QUALITY = "data_quality"


@dataclass(frozen=True)
class Signal:
    """One signal in one scope: fired or not, the severity it asks for and the figures behind it."""

    name: str
    points_to: Points
    scope: str
    fired: bool
    severity: Severity | None
    figures: Mapping[str, Any]
    text: str

    def to_dict(self) -> dict[str, Any]:
        return plain(asdict(self))


@dataclass(frozen=True)
class SiteTraffic:
    """What the service counted for one site in the window: records scored, records refused (422), and
    why: ``by_field`` maps each field a refusal named to ``{reason: records}`` (a record may name several)."""

    site: str
    scored: int
    refused: int
    by_field: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scored < 0 or self.refused < 0:
            raise ValueError(f"site {self.site}: scored and refused must not be negative")

    @property
    def requests(self) -> int:
        return self.scored + self.refused

    @property
    def refusal_rate(self) -> float:
        return self.refused / self.requests if self.requests else 0.0

    @classmethod
    def of(cls, value: SiteTraffic | Mapping[str, Any], site: str | None = None) -> SiteTraffic:
        """From a :class:`SiteTraffic` or a dict with ``scored``, ``refused``, ``by_field`` (and ``site``)."""
        if isinstance(value, SiteTraffic):
            return value
        if site is None and not (isinstance(value, Mapping) and value.get("site")):
            raise ValueError("traffic counts need the site they were counted for ('site')")
        try:
            return cls(
                site=str(value.get("site", site)),
                scored=int(value["scored"]),
                refused=int(value["refused"]),
                by_field={str(k): {str(r): int(n) for r, n in v.items()} for k, v in value.get("by_field", {}).items()},
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"site {site}: traffic needs 'scored', 'refused' and 'by_field' counts ({error})"
            ) from error


@dataclass(frozen=True)
class ScopeSignals:
    """Every signal computed for the whole window or for one site."""

    scope: str
    n_rows: int
    tested: bool
    signals: tuple[Signal, ...]

    @property
    def fired(self) -> tuple[Signal, ...]:
        return tuple(signal for signal in self.signals if signal.fired)

    def get(self, name: str) -> Signal | None:
        return next((signal for signal in self.signals if signal.name == name), None)


@dataclass(frozen=True)
class WindowSignals:
    """All signals of one window: the window's own and each site's; ``columns`` are the window's tests."""

    window: ScopeSignals
    sites: dict[str, ScopeSignals]
    columns: dict[str, ColumnDrift]
    prediction: ColumnDrift | None

    def evidently_dataset_drift(self, share_threshold: float) -> bool | None:
        """Plain Evidently's ``DataDriftPreset`` verdict on the window (None when nothing was tested)."""
        if not self.columns:
            return None
        drifted = sum(column.drifted for column in self.columns.values())
        return drifted / len(self.columns) >= share_threshold


# Signals from column tests ---------------------------------------------------------------------
def prediction_drift_signal(test: ColumnDrift | None, distance: float | None, scope: str, settings: Settings) -> Signal:
    """Drift of the champion's ``probability_malignant``: critical, enough on its own for ``drift``."""
    limit = settings.monitor_prediction_drift_p_value
    if test is None:
        return Signal("prediction_drift", Points.DRIFT, scope, False, None, {}, "no champion scores to compare")
    if test.test == "ks":
        fired, rule = test.score <= limit, f"p <= {limit:g}"
    else:  # reference above 1,000 rows: Evidently's normed Wasserstein distance
        strong = settings.monitor_strong_drift_distance
        fired, rule = test.score >= strong, f"distance >= {strong:g}"
    figures = {"test": test.test, "score": test.score, "rule": rule, "distance": distance}
    text = (
        f"probability_malignant shifted ({test.test} {test.score:.2g}, {rule}; moved {distance or 0:.2f} sd)"
        if fired
        else f"probability_malignant stable ({test.test} {test.score:.2g})"
    )
    return Signal(
        "prediction_drift", Points.DRIFT, scope, bool(fired), Severity.CRITICAL if fired else None, figures, text
    )


def feature_drift_signals(
    columns: Mapping[str, ColumnDrift],
    distances: Mapping[str, float],
    importance: Mapping[str, float],
    scope: str,
    settings: Settings,
) -> tuple[Signal, Signal, Signal]:
    """Importance-weighted share, strongly drifted top features and the plain column share."""
    material = settings.monitor_material_shift
    weights = {name: float(importance.get(name, 0.0)) for name in columns}
    moved = {name: distances.get(name, 0.0) >= material for name in columns}
    drifted = sorted(
        (name for name, column in columns.items() if column.drifted and moved[name]),
        key=lambda name: -weights[name],
    )

    def described(name: str) -> dict[str, Any]:
        column = columns[name]
        return {
            "feature": name,
            "importance": round(weights[name], 4),
            "test": column.test,
            "score": column.score,
            "distance": round(distances.get(name, 0.0), 3),
        }

    share = float(sum(weights[name] for name in drifted))
    limit = settings.monitor_importance_share
    fired = bool(columns) and share >= limit
    names = ", ".join(drifted[:5]) + (" ..." if len(drifted) > 5 else "")
    weighted = Signal(
        "important_feature_drift",
        Points.DRIFT,
        scope,
        fired,
        Severity.CRITICAL if fired else None,
        {"weighted_share": round(share, 4), "threshold": limit, "drifted": [described(n) for n in drifted]},
        f"features carrying {share:.0%} of the model's weight drifted ({names or 'none'}; drift at {limit:.0%})",
    )

    top = sorted(columns, key=lambda name: -weights[name])[: settings.monitor_top_features]
    strong_p, strong_distance = settings.monitor_strong_drift_p_value, settings.monitor_strong_drift_distance

    def strongly(name: str) -> bool:
        column = columns[name]
        if column.test == "ks":
            return column.score <= strong_p and moved[name]
        return column.test == "wasserstein" and column.score >= strong_distance

    strong = [name for name in top if strongly(name)]
    rank = {name: position + 1 for position, name in enumerate(top)}
    top_signal = Signal(
        "top_feature_drift",
        Points.DRIFT,
        scope,
        bool(strong),
        Severity.CRITICAL if strong else None,
        {
            "top_features": top,
            "strongly_drifted": [described(name) | {"rank": rank[name]} for name in strong],
            "p_value_threshold": strong_p,
            "material_shift": material,
        },
        (
            "strong shift in the model's most important features: "
            + ", ".join(f"{n} (#{rank[n]}, p {columns[n].score:.1e}, {distances.get(n, 0):.2f} sd)" for n in strong)
            if strong
            else f"none of the {len(top)} most important features shifted strongly"
        ),
    )

    plain = [name for name, column in columns.items() if column.drifted]
    column_share = len(drifted) / len(columns) if columns else 0.0
    share_limit = settings.drift_share_threshold
    share_fired = bool(columns) and column_share >= share_limit
    share_signal = Signal(
        "column_share_drift",
        Points.DRIFT,
        scope,
        share_fired,
        Severity.WARNING if share_fired else None,
        {
            "share": round(column_share, 4),
            "threshold": share_limit,
            "drifted_columns": sorted(drifted),
            "evidently_share": round(len(plain) / len(columns), 4) if columns else 0.0,
        },
        f"{len(drifted)} of {len(columns)} features drifted materially "
        f"({column_share:.0%}; drift at {share_limit:.0%})",
    )
    return weighted, top_signal, share_signal


def top_feature_mean_shift_signal(
    current: np.ndarray, reference: np.ndarray, names: Sequence[str], scope: str, settings: Settings
) -> Signal:
    """Hotelling's two-sample T² on the means of the most important features (columns ``names`` of
    ``current`` and ``reference``): a joint shift at least ``monitor_top_shift_distance`` far is drift."""
    from scipy.stats import f

    n1, n2, k = len(current), len(reference), len(names)
    shift = current.mean(axis=0) - reference.mean(axis=0)
    pooled = ((n1 - 1) * np.cov(current, rowvar=False) + (n2 - 1) * np.cov(reference, rowvar=False)) / (n1 + n2 - 2)
    distance = float(np.sqrt(max(shift @ np.linalg.pinv(np.atleast_2d(pooled)) @ shift, 0.0)))
    t2 = distance**2 / (1 / n1 + 1 / n2)
    p_value = float(f.sf(t2 * (n1 + n2 - k - 1) / (k * (n1 + n2 - 2)), k, n1 + n2 - k - 1))
    limit, least = settings.monitor_top_shift_p_value, settings.monitor_top_shift_distance
    fired = p_value <= limit and distance >= least
    moved = dict(zip(names, np.round(shift / reference.std(axis=0), 3).tolist(), strict=True))
    figures = {"p_value": p_value, "distance": round(distance, 3), "shift_sd": moved, "p_value_threshold": limit}
    text = (
        f"the {k} most important features moved together ({distance:.2f} Mahalanobis, Hotelling p {p_value:.1e}; "
        f"drift at p <= {limit:g} and >= {least:g}): "
        + ", ".join(f"{name} {value:+.2f} sd" for name, value in moved.items())
    )
    return Signal(
        "top_feature_mean_shift", Points.DRIFT, scope, fired, Severity.CRITICAL if fired else None, figures, text
    )


# Performance signals ---------------------------------------------------------------------------------
def estimated_performance_signal(estimate: PerformanceEstimate | None, scope: str, settings: Settings) -> Signal:
    """CBPE sensitivity below the gate's minimum: ``performance_drop`` (critical when confidently below)."""
    gate = settings.min_sensitivity
    name = "estimated_performance"
    if estimate is None:
        return Signal(name, Points.PERFORMANCE_DROP, scope, False, None, {}, "no performance estimator given")
    figures = {
        "sensitivity": estimate.sensitivity,
        "sensitivity_interval": estimate.interval("sensitivity"),
        "specificity": estimate.specificity,
        "ppv": estimate.ppv,
        "expected_malignant": round(estimate.expected_malignant, 1),
        "gate_min_sensitivity": gate,
    }
    if estimate.sensitivity is None or estimate.expected_malignant < settings.monitor_min_expected_malignant:
        text = f"too few expected malignant cases ({estimate.expected_malignant:.1f}) to estimate sensitivity"
        return Signal(name, Points.PERFORMANCE_DROP, scope, False, None, figures, text)
    low, high = estimate.interval("sensitivity") or (0.0, 1.0)
    fired = estimate.sensitivity < gate
    severity = (Severity.CRITICAL if high < gate else Severity.WARNING) if fired else None
    text = (
        f"estimated sensitivity {estimate.sensitivity:.3f} (95 % {low:.3f}-{high:.3f}) "
        f"{'below' if fired else 'meets'} the gate's {gate:.2f}; specificity {estimate.specificity or 0:.3f}"
    )
    return Signal(name, Points.PERFORMANCE_DROP, scope, bool(fired), severity, figures, text)


def realized_performance_signal(labelled: pd.DataFrame, scope: str, settings: Settings) -> Signal:
    """Sensitivity and specificity from feedback labels, 95 % Wilson intervals; confidently below the gate
    (the upper end of the ``monitor_realized_confidence`` Wilson interval under it) fires."""
    from statsmodels.stats.proportion import proportion_confint

    name = "realized_performance"
    truth = (labelled[LABEL] == POSITIVE).to_numpy() if len(labelled) else np.zeros(0, dtype=bool)
    flagged = (labelled[PREDICTED_LABEL] == POSITIVE).to_numpy() if len(labelled) else np.zeros(0, dtype=bool)
    tp, fn = int((truth & flagged).sum()), int((truth & ~flagged).sum())
    tn, fp = int((~truth & ~flagged).sum()), int((~truth & flagged).sum())
    gate = settings.min_sensitivity
    figures: dict[str, Any] = {
        "labelled": len(labelled),
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "gate_min_sensitivity": gate,
    }
    for metric, hits, total in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp)):
        figures[metric] = hits / total if total else None
        figures[f"{metric}_interval"] = (
            tuple(float(x) for x in proportion_confint(hits, total, method="wilson")) if total else None
        )
    if tp + fn < settings.monitor_feedback_min_malignant:
        text = f"{tp + fn} labelled malignant cases, fewer than {settings.monitor_feedback_min_malignant}: not judged"
        return Signal(name, Points.PERFORMANCE_DROP, scope, False, None, figures, text)
    low, high = figures["sensitivity_interval"]
    level = settings.monitor_realized_confidence
    upper = float(proportion_confint(tp, tp + fn, alpha=1 - level, method="wilson")[1])
    figures.update(sensitivity_upper_bound=upper, upper_bound_level=level)
    fired = upper < gate
    text = (
        f"sensitivity from {len(labelled)} labels {figures['sensitivity']:.3f} (95 % {low:.3f}-{high:.3f}; "
        f"{level * 100:g} % upper bound {upper:.3f}) "
        f"{'confidently below' if fired else 'not confidently below'} the gate's {gate:.2f}"
    )
    return Signal(
        name, Points.PERFORMANCE_DROP, scope, bool(fired), Severity.CRITICAL if fired else None, figures, text
    )


# Data quality ------------------------------------------------------------------------------------------
def refusal_signal(
    traffic: SiteTraffic, baseline_refused: int, baseline_requests: int, baseline_from: str, settings: Settings
) -> Signal:
    """A site whose share of refused records jumped above its baseline: ``data_quality``, naming the fields.

    The baseline counts as high as its 95 % Wilson interval allows (a site that had no refusal in
    80 earlier records may well refuse 4 %), and the site's rate must exceed it by
    ``monitor_refusal_jump`` and confidently exceed it at all.
    """
    from statsmodels.stats.proportion import proportion_confint

    name = "refusal_rate"
    rate, jump = traffic.refusal_rate, settings.monitor_refusal_jump
    observed = baseline_refused / baseline_requests if baseline_requests else 0.0
    ceiling = (
        float(proportion_confint(baseline_refused, baseline_requests, method="wilson")[1]) if baseline_requests else 0.0
    )
    counts = {name: int(sum(reasons.values())) for name, reasons in traffic.by_field.items()}
    fields = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    figures = {
        "requests": traffic.requests,
        "refused": traffic.refused,
        "refusal_rate": round(rate, 4),
        "baseline_rate": round(observed, 4),
        "baseline_ceiling": round(ceiling, 4),
        "baseline_from": baseline_from,
        "fields": {name: dict(traffic.by_field[name]) for name, _ in fields},
    }
    if traffic.requests < settings.monitor_refusal_min_requests:
        text = f"{traffic.requests} records, fewer than {settings.monitor_refusal_min_requests}: refusals not judged"
        return Signal(name, Points.DATA_QUALITY, traffic.site, False, None, figures, text)
    low, _ = proportion_confint(traffic.refused, traffic.requests, method="wilson")
    fired = rate >= ceiling + jump and low > ceiling
    severity = (
        (Severity.CRITICAL if rate >= settings.monitor_refusal_critical_rate else Severity.WARNING) if fired else None
    )
    named = ", ".join(f"{field_name} ({count})" for field_name, count in fields[:5]) or "no field named"
    baseline = f"baseline {observed:.1%} from {baseline_from}"
    text = (
        f"{traffic.refused} of {traffic.requests} records refused ({rate:.1%}, {baseline}): {named}"
        if fired
        else f"refusal rate {rate:.1%} ({baseline})"
    )
    return Signal(name, Points.DATA_QUALITY, traffic.site, bool(fired), severity, figures, text)


def refusal_signals(
    traffic: Iterable[SiteTraffic | Mapping[str, Any]] | Mapping[str, SiteTraffic | Mapping[str, Any]],
    settings: Settings,
    baseline: Mapping[str, SiteTraffic | Mapping[str, Any]] | None = None,
) -> dict[str, Signal]:
    """One refusal signal per site. The baseline is the site's own earlier traffic when it has enough
    records, else the pooled traffic of the window's other sites, else none."""
    sites = _traffic_by_site(traffic)
    earlier = _traffic_by_site(baseline or {})
    found = {}
    for site, counts in sites.items():
        own = earlier.get(site)
        others = [c for name, c in sites.items() if name != site]
        other_requests = sum(c.requests for c in others)
        if own is not None and own.requests >= settings.monitor_refusal_min_requests:
            base = own.refused, own.requests, "its own earlier traffic"
        elif other_requests >= settings.monitor_refusal_min_requests:
            base = sum(c.refused for c in others), other_requests, "the other sites"
        else:
            base = 0, 0, "no earlier or other traffic"
        found[site] = refusal_signal(counts, *base, settings)
    return found


def _traffic_by_site(
    traffic: Iterable[SiteTraffic | Mapping[str, Any]] | Mapping[str, SiteTraffic | Mapping[str, Any]],
) -> dict[str, SiteTraffic]:
    if isinstance(traffic, Mapping):
        return {str(site): SiteTraffic.of(value, str(site)) for site, value in traffic.items()}
    return {counts.site: counts for counts in map(SiteTraffic.of, traffic)}


# All signals of a window -----------------------------------------------------------------------------
def compute_signals(
    current: pd.DataFrame,
    reference: pd.DataFrame,
    settings: Settings,
    *,
    importance: Mapping[str, float],
    estimator: PerformanceEstimator | None = None,
    feedback: pd.DataFrame | None = None,
    labelled: pd.DataFrame | None = None,
    traffic: Iterable[SiteTraffic | Mapping[str, Any]] | Mapping[str, Any] | None = None,
    baseline_traffic: Mapping[str, SiteTraffic | Mapping[str, Any]] | None = None,
) -> WindowSignals:
    """Every signal for the window and each site.

    ``current``: prediction-log rows, scores blanked where another version served; ``reference``:
    the champion's reference rows with its scores on them; ``importance``: feature -> weight from
    the training run. ``labelled``: labelled predictions, oldest first, the window's and earlier
    ones (default: the window's joined with ``feedback``); realized performance is judged on the
    latest ``monitor_label_window`` of them overall and of each site. ``traffic``: per-site
    scored/refused counts (:class:`SiteTraffic` or dicts), ``baseline_traffic`` the same from before.
    """
    from monitoring.drift import SiteGroups, label_predictions, run_column_tests, shared_features
    from pipelines.metrics import normalised

    columns = shared_features(current, reference)
    weights = normalised({name: importance.get(name, 0.0) for name in columns})
    unknown = sorted(set(importance) - set(columns) - {PROBABILITY})
    if unknown:
        raise ValueError(f"importance names columns the window does not have: {', '.join(unknown[:5])}")

    site_sizes = current[SITE].value_counts(sort=False).to_dict() if SITE in current.columns else {}
    site_sizes = {str(site): int(size) for site, size in site_sizes.items()}
    tested_sites = [site for site, size in site_sizes.items() if size >= settings.monitor_site_min_rows]
    window_tested = len(current) >= settings.drift_min_rows
    site_of = current[SITE].astype(str).to_numpy() if SITE in current.columns else np.full(len(current), "")

    scores_ok = PROBABILITY in current.columns and PROBABILITY in reference.columns
    tested = [*columns, PROBABILITY] if scores_ok else columns
    overall: dict[str, ColumnDrift] = {}
    by_site: dict[str, dict[str, ColumnDrift]] = {}
    distances: dict[str, dict[str, float]] = {}
    if window_tested or tested_sites:
        # Sites too small for their own tests share one group, so all rows stay in the window's tests.
        rest = "\x00rest"
        grouped = np.where(np.isin(site_of, tested_sites), site_of, rest)
        groups = SiteGroups.of(pd.DataFrame({SITE: grouped})) if tested_sites else SiteGroups((), None)
        overall, per_site = run_column_tests(current, reference, tested, groups)
        for index, site in enumerate(groups.names):
            if site != rest:
                by_site[site] = {name: tests[index] for name, tests in per_site.items() if tests[index] is not None}
        # Distances only where a test found drift: they decide whether the drift is material.
        wanted = {
            scope: [name for name, test in tests.items() if test.drifted or name == PROBABILITY]
            for scope, tests in {_WHOLE: overall, **by_site}.items()
        }
        distances = _distances(current, reference, wanted, grouped)

    if labelled is None and feedback is not None:
        labelled = label_predictions(current, feedback)
    estimates: dict[str, PerformanceEstimate | None] = {}
    if estimator is not None and PROBABILITY in current.columns:
        scores = current[PROBABILITY].to_numpy(dtype="float64")
        served = (current[PREDICTED_LABEL] == POSITIVE).to_numpy() if PREDICTED_LABEL in current.columns else None
        usable = np.isfinite(scores)
        for scope, rows in [(_WHOLE, usable)] + [(site, usable & (site_of == site)) for site in tested_sites]:
            if rows.sum():
                estimates[scope] = estimator.estimate(scores[rows], None if served is None else served[rows])

    refusals = refusal_signals(traffic, settings, baseline_traffic) if traffic is not None else {}
    top = sorted(columns, key=lambda name: -weights[name])[: settings.monitor_top_features]
    top_current = current[top].to_numpy(dtype="float64")
    top_reference = reference[top].dropna().to_numpy(dtype="float64")

    def scope_signals(
        scope: str, key: str, n_rows: int, drift_tested: bool, tests: dict[str, ColumnDrift], rows: pd.DataFrame | None
    ) -> ScopeSignals:
        signals: list[Signal] = []
        if drift_tested:
            feature_tests = {name: tests[name] for name in columns if name in tests}
            moved = distances.get(key, {})
            signals.append(prediction_drift_signal(tests.get(PROBABILITY), moved.get(PROBABILITY), scope, settings))
            signals.extend(feature_drift_signals(feature_tests, moved, weights, scope, settings))
            rows_top = top_current if key == _WHOLE else top_current[site_of == key]
            rows_top = rows_top[np.isfinite(rows_top).all(axis=1)]
            signals.append(top_feature_mean_shift_signal(rows_top, top_reference, top, scope, settings))
            if estimator is not None:
                signals.append(estimated_performance_signal(estimates.get(key), scope, settings))
        if rows is not None and len(rows):
            signals.append(realized_performance_signal(rows, scope, settings))
        if key in refusals:
            signals.append(refusals[key])
        return ScopeSignals(scope, n_rows, drift_tested, tuple(signals))

    latest = settings.monitor_label_window
    window_labels = labelled.tail(latest) if labelled is not None and len(labelled) else None
    window = scope_signals(WINDOW, _WHOLE, len(current), window_tested, overall, window_labels)
    label_sites = labelled[SITE].astype(str) if window_labels is not None and SITE in labelled.columns else None
    sites: dict[str, ScopeSignals] = {}
    for site in sorted(set(site_sizes) | set(refusals)):
        rows = None if label_sites is None else labelled[label_sites == site].tail(latest)
        sites[site] = scope_signals(site, site, site_sizes.get(site, 0), site in by_site, by_site.get(site, {}), rows)
    prediction = overall.get(PROBABILITY) if window_tested else None
    window_columns = {name: overall[name] for name in columns if name in overall} if window_tested else {}
    return WindowSignals(window, sites, window_columns, prediction)


def _distances(
    current: pd.DataFrame, reference: pd.DataFrame, wanted: Mapping[str, list[str]], site_of: np.ndarray
) -> dict[str, dict[str, float]]:
    """How far the wanted columns moved per scope, in reference standard deviations (Evidently's normed Wasserstein)."""
    from monitoring.drift import wasserstein_normed

    found: dict[str, dict[str, float]] = {scope: {} for scope in wanted}
    references: dict[str, np.ndarray] = {}
    for scope, names in wanted.items():
        mask = None if scope == _WHOLE else site_of == scope
        for name in names:
            if name not in references:
                ref = reference[name].to_numpy(dtype="float64")
                references[name] = np.sort(ref[np.isfinite(ref)])
            values = current[name].to_numpy(dtype="float64")
            values = values if mask is None else values[mask]
            values = np.sort(values[np.isfinite(values)])
            if len(values) and len(references[name]):
                found[scope][name] = wasserstein_normed(references[name], values)
    return found
