"""The Evidently UI medops starts: reports open to read on loopback, writes only with the secret."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import psutil
import pytest

from medops.app import platform
from medops.core import processes
from medops.core.settings import Settings
from serving.processes import find_free_port

pytestmark = pytest.mark.integration


def test_the_evidently_ui_refuses_writes_without_the_secret(medops_home: Settings, monkeypatch):
    port = find_free_port()
    monkeypatch.setenv("MEDOPS_EVIDENTLY_PORT", str(port))
    from medops.core.settings import get_settings, reset_settings

    reset_settings()
    settings = get_settings()
    pid = platform.start_evidently(settings)
    try:
        base = f"http://127.0.0.1:{port}"
        processes.wait_until(lambda: processes.http_ok(f"{base}/api/projects"), 60, "Evidently UI")
        assert settings.evidently_secret() not in " ".join(psutil.Process(pid).cmdline())
        body = {"name": "intruder", "description": "should not exist"}
        refused = httpx.post(f"{base}/api/projects", json=body, timeout=10)
        assert refused.status_code in (401, 403), refused.text
        assert httpx.get(f"{base}/api/projects", timeout=10).status_code == 200
        allowed = httpx.post(
            f"{base}/api/projects", json=body, headers={"evidently-secret": settings.evidently_secret()}, timeout=10
        )
        assert allowed.status_code < 300, allowed.text
    finally:
        processes.stop("evidently", settings)


def _windows(settings: Settings) -> list:
    """Three monitoring windows judged as monitor_drift judges them: two calm, then site-d shifted."""
    from monitoring.judge import assess_window
    from monitoring.scenarios import fit_champion, generate_window

    champion = fit_champion(settings)
    judged = []
    for seed, scenario in enumerate(("calm", "calm", "important_x1.5")):
        window = generate_window(scenario, 600, champion, np.random.default_rng(seed))
        verdict, _ = assess_window(
            window.current,
            champion.reference,
            settings,
            importance=champion.importance,
            estimator=champion.estimator,
            feedback=window.feedback,
            traffic=window.traffic,
        )
        judged.append(verdict)
    return judged


def test_the_dashboard_charts_each_window_against_its_thresholds_and_per_site(medops_home: Settings, monkeypatch):
    from evidently.ui.workspace import Workspace

    from monitoring.dashboard import save_dashboard
    from monitoring.reports import add_to_workspace, verdict_snapshot

    port = find_free_port()
    monkeypatch.setenv("MEDOPS_EVIDENTLY_PORT", str(port))
    from medops.core.settings import get_settings, reset_settings

    reset_settings()
    settings = get_settings()
    judged = _windows(settings)
    assert [str(found.verdict) for found in judged] == ["no_drift", "no_drift", "drift"]
    versions = {"model_version": "1", "data_version": "data-v1"}
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for hour, found in enumerate(judged):
        snapshot = verdict_snapshot(found, settings, start + timedelta(hours=hour), versions)
        project_id, _ = add_to_workspace(
            settings, [("verdict", snapshot)], name=f"window {hour}", sites=list(found.sites)
        )
    sites = sorted(judged[-1].sites)
    assert sites == ["site-a", "site-b", "site-c", "site-d"]
    workspace = Workspace(str(settings.evidently_workspace))
    written = workspace.get_dashboard(project_id)
    # Written again by the next run, which saw one site only: nothing doubles, no site tab is lost.
    assert save_dashboard(workspace, project_id, ["site-a"]) == written
    assert len(workspace.search_project(settings.model_name)) == 1

    platform.start_evidently(settings)
    try:
        base = f"http://127.0.0.1:{port}/api"
        processes.wait_until(lambda: processes.http_ok(f"{base}/projects"), 60, "Evidently UI")
        dashboard = httpx.get(f"{base}/v2/dashboards/{project_id}", timeout=10).json()
        panels = {panel["title"]: panel for panel in dashboard["panels"]}
        assert len(panels) == len(dashboard["panels"]) == 7 + 3 * len(sites)
        assert [tab["title"] for tab in dashboard["tabs"]] == ["Verdict", "Signals", "Sensitivity"] + [
            f"Site {site}" for site in sites
        ]
        assert all(len(tab["panels"]) == len(set(tab["panels"])) for tab in dashboard["tabs"])

        def series(title: str) -> dict[str, list[float | None]]:
            """The panel's series as the UI fetches them, by legend."""
            values = panels[title]["values"]
            keys = ("tags", "metadata", "metric", "metric_labels")
            body = {"series_filter": [{key: value[key] for key in keys} for value in values]}
            found = httpx.post(f"{base}/v2/snapshots/{project_id}/data_series_batch", json=body, timeout=30)
            assert found.status_code < 300, found.text
            return {values[s["filter_index"]]["legend"]: s["values"] for s in found.json()["series"]}

        verdicts = series(next(title for title in panels if title.startswith("Verdict per window")))
        assert verdicts["verdict code"] == [0, 0, 2]
        p_values = series("Prediction drift: KS p-value of probability_malignant")
        threshold = p_values["threshold (p-value: drift at or below)"]
        assert threshold == [settings.monitor_prediction_drift_p_value] * 3 and len(p_values["p-value"]) == 3
        weighted = series("Share of the model's weight in drifted features")
        assert weighted["threshold (weighted share: drift at or above)"] == [settings.monitor_importance_share] * 3
        sensitivity = series("Sensitivity: estimated (CBPE, 95 % interval) and realized (feedback labels)")
        assert set(sensitivity) == {
            "estimated",
            "estimated, 95 % low",
            "estimated, 95 % high",
            "realized",
            "threshold (gate's minimum sensitivity)",
        }
        assert sensitivity["threshold (gate's minimum sensitivity)"] == [settings.min_sensitivity] * 3
        assert all(
            low <= high
            for low, high in zip(sensitivity["estimated, 95 % low"], sensitivity["estimated, 95 % high"], strict=True)
        )
        for site in sites:
            drift = series(f"{site}: prediction drift p-value")
            refusals = series(f"{site}: refusal rate")
            assert len(drift["p-value"]) == len(refusals["refusal rate"]) == 3
            assert len(refusals["threshold (site's baseline bound + jump)"]) == 3
            assert set(series(f"{site}: estimated sensitivity")) == {
                "estimated",
                "threshold (gate's minimum sensitivity)",
            }
        shifted = series("site-d: prediction drift p-value")
        assert shifted["p-value"][-1] <= settings.monitor_prediction_drift_p_value < shifted["p-value"][0]
    finally:
        processes.stop("evidently", settings)
