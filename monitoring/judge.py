"""One verdict per window and per site from the signals of :mod:`monitoring.signals`.

Within one scope (the window, or one site) the verdict is, in this order:

1. ``data_quality`` when the scope's refusals jumped: broken inputs explain whatever else moved
   there, and a model must not learn from them, so this verdict never retrains;
2. ``performance_drop`` when estimated or realized sensitivity fell below the gate's minimum;
3. ``drift`` when predictions or the features the model relies on moved;
4. ``no_drift`` when the scope had enough rows to be tested, else ``insufficient_data``.

The severity is the highest among the fired signals of that verdict. The window's own verdict
is the gravest over its scopes (critical before warning; then performance_drop, drift,
data_quality), with the scope that led it named. Retraining is due when a scope's verdict is
``drift`` or ``performance_drop`` at ``critical``; the window-wide scope only counts when no site
has a data-quality incident (its drift may be that site's broken inputs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from monitoring.drift import Verdict, plain
from monitoring.signals import WINDOW, ScopeSignals, Severity, Signal, WindowSignals

if TYPE_CHECKING:
    from medops.core.settings import Settings


RETRAINING_VERDICTS = (Verdict.DRIFT, Verdict.PERFORMANCE_DROP)
# Within a scope: the first verdict with a fired signal wins (a signal points to the verdict of its name).
_WITHIN_SCOPE = (Verdict.DATA_QUALITY, Verdict.PERFORMANCE_DROP, Verdict.DRIFT)
# Across scopes: how grave a verdict is for the window's headline (and its code on the dashboard).
VERDICT_CODES = {
    Verdict.PERFORMANCE_DROP: 3,
    Verdict.DRIFT: 2,
    Verdict.DATA_QUALITY: 1,
    Verdict.NO_DRIFT: 0,
    Verdict.INSUFFICIENT_DATA: -1,
}
SEVERITY_CODES = {None: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


@dataclass(frozen=True)
class ScopeVerdict:
    """The verdict for the whole window or one site, with every signal that fired and its figures."""

    scope: str
    n_rows: int
    verdict: Verdict
    severity: Severity | None
    fired: tuple[Signal, ...]
    signals: tuple[Signal, ...]

    @property
    def retrains(self) -> bool:
        return self.verdict in RETRAINING_VERDICTS and self.severity == Severity.CRITICAL


@dataclass(frozen=True)
class WindowVerdict:
    """The window's verdict (led by ``scope``), the window-wide and per-site verdicts, and whether to retrain."""

    verdict: Verdict
    severity: Severity | None
    scope: str
    retrain: bool
    window: ScopeVerdict
    sites: dict[str, ScopeVerdict]

    @property
    def alerting_sites(self) -> tuple[str, ...]:
        return tuple(site for site, found in self.sites.items() if found.fired)

    def fired_text(self) -> str:
        """Every fired signal with its scope, in one line for a report's metadata."""
        fired = [signal for scope in (self.window, *self.sites.values()) for signal in scope.fired]
        return "; ".join(f"{signal.scope}: {signal.text}" for signal in fired) or "none fired"

    def summary(self) -> dict[str, Any]:
        return plain(asdict(self))


def judge_scope(signals: ScopeSignals) -> ScopeVerdict:
    """The verdict for one scope: data_quality, then performance_drop, then drift (see the module)."""
    fired = signals.fired
    for verdict in _WITHIN_SCOPE:
        chosen = [signal for signal in fired if signal.points_to == verdict]
        if chosen:
            severity = max((signal.severity for signal in chosen), key=lambda s: SEVERITY_CODES[s])
            return ScopeVerdict(signals.scope, signals.n_rows, verdict, severity, fired, signals.signals)
    verdict = Verdict.NO_DRIFT if signals.tested else Verdict.INSUFFICIENT_DATA
    return ScopeVerdict(signals.scope, signals.n_rows, verdict, None, fired, signals.signals)


def judge_window(signals: WindowSignals) -> WindowVerdict:
    """Combine a window's signals into its verdict, its sites' verdicts and the retraining decision.

    The thresholds from settings were applied when the signals were computed
    (:func:`monitoring.signals.compute_signals`); the judge only ranks what fired.
    """
    window = judge_scope(signals.window)
    sites = {site: judge_scope(scope) for site, scope in signals.sites.items()}
    lead = max([window, *sites.values()], key=_rank)
    broken_inputs = any(found.verdict == Verdict.DATA_QUALITY for found in sites.values())
    retrain = any(found.retrains for found in sites.values()) or (window.retrains and not broken_inputs)
    return WindowVerdict(lead.verdict, lead.severity, lead.scope, retrain, window, sites)


def _rank(found: ScopeVerdict) -> tuple[int, int, int]:
    # Ties go to the window-wide scope (it speaks for all rows).
    return SEVERITY_CODES[found.severity], VERDICT_CODES[found.verdict], int(found.scope == WINDOW)


def assess_window(
    current: Any,
    reference: Any,
    settings: Settings,
    *,
    importance: Mapping[str, float],
    **inputs: Any,
) -> tuple[WindowVerdict, WindowSignals]:
    """:func:`~monitoring.signals.compute_signals` then :func:`judge_window`, in one call."""
    from monitoring.signals import compute_signals

    found = compute_signals(current, reference, settings, importance=importance, **inputs)
    return judge_window(found), found
