"""The judge: precedence of verdicts within a scope, the window's headline across scopes, retraining."""

from __future__ import annotations

import numpy as np
import pytest

from medops.core.settings import Settings
from monitoring.judge import Verdict, assess_window, judge_scope, judge_window
from monitoring.scenarios import AFFECTED_SITE, fit_champion, generate_window
from monitoring.signals import WINDOW, Points, ScopeSignals, Severity, Signal, WindowSignals


def signal(name: str, points: Points, severity: Severity | None, scope: str = WINDOW) -> Signal:
    return Signal(name, points, scope, severity is not None, severity, {"n": 1}, name)


DRIFT_CRITICAL = ("prediction_drift", Points.DRIFT, Severity.CRITICAL)
DRIFT_WARNING = ("column_share_drift", Points.DRIFT, Severity.WARNING)
DROP_CRITICAL = ("realized_performance", Points.PERFORMANCE_DROP, Severity.CRITICAL)
DROP_WARNING = ("estimated_performance", Points.PERFORMANCE_DROP, Severity.WARNING)
QUALITY_WARNING = ("refusal_rate", Points.DATA_QUALITY, Severity.WARNING)
QUIET = ("top_feature_drift", Points.DRIFT, None)


def scope(name: str, *specs: tuple, tested: bool = True, rows: int = 300) -> ScopeSignals:
    return ScopeSignals(name, rows, tested, tuple(signal(n, p, s, name) for n, p, s in specs))


@pytest.mark.parametrize(
    ("specs", "tested", "verdict", "severity"),
    [
        ((QUIET,), True, Verdict.NO_DRIFT, None),
        ((), False, Verdict.INSUFFICIENT_DATA, None),
        ((DRIFT_WARNING, QUIET), True, Verdict.DRIFT, Severity.WARNING),
        ((DRIFT_WARNING, DRIFT_CRITICAL), True, Verdict.DRIFT, Severity.CRITICAL),
        ((DRIFT_CRITICAL, DROP_WARNING), True, Verdict.PERFORMANCE_DROP, Severity.WARNING),
        ((DRIFT_CRITICAL, DROP_CRITICAL, QUALITY_WARNING), True, Verdict.DATA_QUALITY, Severity.WARNING),
        ((DROP_CRITICAL,), False, Verdict.PERFORMANCE_DROP, Severity.CRITICAL),  # labels judged without drift tests
    ],
)
def test_precedence_within_a_scope(specs, tested, verdict, severity):
    found = judge_scope(scope("site-a", *specs, tested=tested))
    assert (found.verdict, found.severity) == (verdict, severity)
    assert [s.name for s in found.fired] == [n for n, _, s in specs if s is not None]


def _window(window: ScopeSignals, **sites: ScopeSignals) -> WindowSignals:
    return WindowSignals(window, dict(sites), {}, None)


def test_a_critical_site_leads_a_quiet_window_and_retrains():
    found = judge_window(
        _window(scope(WINDOW, QUIET), **{"site-a": scope("site-a", QUIET), "site-d": scope("site-d", DRIFT_CRITICAL)})
    )
    assert (found.verdict, found.severity, found.scope) == (Verdict.DRIFT, Severity.CRITICAL, "site-d")
    assert found.retrain and found.alerting_sites == ("site-d",)
    assert found.window.verdict == Verdict.NO_DRIFT and found.sites["site-a"].verdict == Verdict.NO_DRIFT


def test_warnings_alert_but_do_not_retrain():
    found = judge_window(_window(scope(WINDOW, DRIFT_WARNING), **{"site-a": scope("site-a", DROP_WARNING)}))
    assert found.severity == Severity.WARNING and not found.retrain
    # Same severity: a performance drop is graver than drift for the headline.
    assert (found.verdict, found.scope) == (Verdict.PERFORMANCE_DROP, "site-a")


def test_data_quality_never_retrains_and_holds_back_window_wide_drift():
    sites = {"site-b": scope("site-b", QUALITY_WARNING, DRIFT_CRITICAL), "site-a": scope("site-a", QUIET)}
    found = judge_window(_window(scope(WINDOW, DRIFT_CRITICAL), **sites))
    assert found.sites["site-b"].verdict == Verdict.DATA_QUALITY
    assert found.verdict == Verdict.DRIFT and found.scope == WINDOW
    assert not found.retrain  # the window's drift may be site-b's broken inputs
    # Drift at another, healthy site still retrains.
    sites["site-c"] = scope("site-c", DROP_CRITICAL)
    assert judge_window(_window(scope(WINDOW, QUIET), **sites)).retrain


def test_nothing_testable_is_insufficient_data():
    found = judge_window(
        _window(scope(WINDOW, tested=False, rows=40), **{"site-a": scope("site-a", tested=False, rows=40)})
    )
    assert found.verdict == Verdict.INSUFFICIENT_DATA and found.severity is None and not found.retrain
    summary = found.summary()
    assert summary["verdict"] == "insufficient_data" and summary["sites"]["site-a"]["n_rows"] == 40


@pytest.fixture(scope="module")
def champion():
    return fit_champion(Settings())


def test_the_issue_case_a_site_whose_calibration_moved_is_drift_not_no_drift(champion):
    """400 requests, half from a site whose calibration moved 3 important features: the column rule says no drift."""
    settings = Settings()
    window = generate_window("important_x1.5", 400, champion, np.random.default_rng(10))
    verdict, signals = assess_window(
        window.current,
        champion.reference,
        settings,
        importance=champion.importance,
        estimator=champion.estimator,
        feedback=window.feedback,
        traffic=window.traffic,
    )
    assert signals.evidently_dataset_drift(settings.drift_share_threshold) is False
    assert verdict.verdict == Verdict.DRIFT and verdict.severity == Severity.CRITICAL and verdict.retrain
    assert verdict.sites[AFFECTED_SITE].verdict == Verdict.DRIFT
    json_ready = verdict.summary()
    assert json_ready["sites"][AFFECTED_SITE]["fired"][0]["figures"]


def test_calm_window_is_no_drift(champion):
    settings = Settings()
    window = generate_window("calm", 800, champion, np.random.default_rng(11))
    verdict, _ = assess_window(
        window.current, champion.reference, settings, importance=champion.importance, estimator=champion.estimator
    )
    assert verdict.verdict == Verdict.NO_DRIFT and not verdict.retrain and verdict.alerting_sites == ()
