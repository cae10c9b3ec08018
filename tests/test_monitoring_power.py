"""The monitoring-power section's table: what counts as a detection, a false alarm and a goal."""

from __future__ import annotations

from bench.common import SectionResult
from bench.monitoring_power import _rows_and_goals
from monitoring.scenarios import SCENARIOS


def _result(scenario: str, rows: int, verdict: str, evidently: bool = False) -> dict:
    retrain = verdict in ("drift", "performance_drop")
    severity = None if verdict in ("no_drift", "insufficient_data") else "critical"
    return {
        "scenario": scenario,
        "rows": rows,
        "verdict": verdict,
        "severity": severity,
        "scope": "site-d",
        "retrain": retrain,
        "evidently": evidently,
        "fired": [f"site-d:{verdict}_signal"] if severity else [],
    }


def test_table_counts_alerts_as_false_alarms_and_the_right_verdicts_as_detections():
    results = (
        [_result("calm", 200, "no_drift")] * 97
        + [_result("calm", 200, "insufficient_data")] * 2  # silence, not an alarm
        + [_result("calm", 200, "data_quality", evidently=True)]
    )
    results += [_result("important_x1.5", 200, "drift")] * 19 + [_result("important_x1.5", 200, "data_quality")]
    results += [_result("wrong_unit", 200, "data_quality")] * 20
    results += [_result("ignored_x1.25", 200, "no_drift")] * 20
    effects = {name: {"prediction_shift": 0.0, "sensitivity": 0.97} for name in SCENARIOS}
    effects["important_x1.5"] = {"prediction_shift": 0.38, "sensitivity": 1.0}
    moving = {name: name == "important_x1.5" for name in SCENARIOS}
    section = SectionResult("monitoring")
    _rows_and_goals(section, results, (200,), moving, effects)

    table = section.data["table"]
    assert table["calm"]["200"]["medops"] == 1 and table["calm"]["200"]["plain_evidently"] == 1
    # A data-quality verdict does not catch a shift of important features.
    assert table["important_x1.5"]["200"]["medops"] == 19 and table["important_x1.5"]["200"]["retrain"] == 19
    assert table["wrong_unit"]["200"]["medops"] == 20
    goals = {goal.name.split(" (")[0]: goal for goal in section.goals}
    assert goals["false alarms: calm at 200 rows"].met is True  # 1 of 100 = 1 %
    assert goals["detection: important_x1.5 at 200 rows"].met is True  # 95 %
    assert goals["detection: wrong_unit at 200 rows"].met is True
    assert "detection: ignored_x1.25 at 200 rows" not in goals  # moves nothing: no goal
    rows = {row["case"]: row for row in section.rows}
    assert rows["important_x1.5, 200 rows"]["medops"] == "95% (19/20)"
    assert rows["ignored_x1.25, 200 rows"]["goal"] == "" and rows["ignored_x1.25, 200 rows"]["met"] is None


def test_label_history_holds_each_sites_latest_labels_from_earlier_windows_of_the_stream():
    from bench.monitoring_power import _generate, _labels_before, _settings, _start
    from medops.core.settings import Settings
    from monitoring.drift import label_predictions
    from monitoring.scenarios import fit_champion
    from pipelines.schema import SITE

    settings = _settings(monitor_label_window=40)
    _start(fit_champion(Settings()), settings, "report")
    history = _labels_before("calm", 100, 0, 1, settings.monitor_label_window)
    assert history[SITE].value_counts().to_dict() == dict.fromkeys(("site-a", "site-b", "site-c", "site-d"), 40)
    # One 100-row window labels far fewer cases of a calm site: the rest came from the windows before it.
    window, _ = _generate("calm", 100, -1, 1)
    assert (label_predictions(window.current, window.feedback)[SITE] == "site-a").sum() < 20
