"""What people see: plots that say malignant with the metric's AUC, run notes, links, data events."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from medops.app.run_notes import alert_delivery, monitoring_note
from medops.core import links
from medops.core.settings import Settings
from pipelines.metrics import Evaluation


def test_roc_plot_names_malignant_and_the_metric_auc_and_labels_fit():
    from sklearn.metrics import roc_auc_score

    from pipelines.figures import evaluation_figures

    rng = np.random.default_rng(0)
    is_malignant = rng.random(200) < 0.4
    probability = np.clip(is_malignant * 0.35 + rng.random(200) * 0.65, 0, 1)
    auc = roc_auc_score(is_malignant, probability)
    evaluation = Evaluation({"roc_auc": auc}, probability, is_malignant, probability >= 0.5)
    figures = evaluation_figures(evaluation)
    (legend_text,) = [t.get_text() for t in figures["roc_curve.png"].axes[0].get_legend().get_texts()][:1]
    assert legend_text == f"malignant (AUC = {auc:.4f})"
    assert "Positive label: malignant" in figures["roc_curve.png"].axes[0].get_xlabel()
    matrix = figures["confusion_matrix.png"]
    matrix.canvas.draw()
    box = matrix.bbox
    for label in (matrix.axes[0].xaxis.label, matrix.axes[0].yaxis.label):
        extent = label.get_window_extent()
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1


def test_links_are_urls_into_each_ui():
    settings = Settings(home="/tmp/x", airflow_port=8081, mlflow_port=5001)
    assert links.airflow_run(settings, "train_model", "manual__2026-01-01T00:00:00+00:00") == (
        "http://127.0.0.1:8081/dags/train_model/runs/manual__2026-01-01T00%3A00%3A00%2B00%3A00"
    )
    assert (
        links.mlflow_model_version(settings, "breast-cancer", 3)
        == "http://127.0.0.1:5001/#/models/breast-cancer/versions/3"
    )
    assert links.mlflow_run(settings, "1", "abc") == "http://127.0.0.1:5001/#/experiments/1/runs/abc"
    assert (
        links.evidently_report(Settings(home="/tmp/x", evidently_port=8001), "p-1", "s-2")
        == "http://127.0.0.1:8001/projects/p-1/reports/s-2"
    )


def test_monitoring_note_says_the_alert_reached_nobody():
    result = {
        "verdict": "drift",
        "n_current": 400,
        "model_version": "2",
        "drifted_columns": ["mean_radius", "mean_area"],
        "sites": ["site-d"],
        "report_url": "http://127.0.0.1:8000/projects/p/reports/r",
    }
    alert = {"sent": False, "deduplicated": False, "channels": {"webhook": "not configured", "email": "not configured"}}
    note = monitoring_note(result, alert | {"outbox": "/h/alerts/outbox/a.json"}, Settings(home="/tmp/x"))
    assert note.startswith("**drift** on 400 predictions of model v2")
    assert "[Evidently report](http://127.0.0.1:8000/projects/p/reports/r)" in note
    assert "**NOT DELIVERED**: no channel configured" in note and "/h/alerts/outbox/a.json" in note
    failed = {"sent": False, "channels": {"webhook": "failed: refused", "email": "not configured"}, "outbox": "f"}
    assert "webhook failed: refused" in alert_delivery(failed)
    assert (
        alert_delivery({"sent": True, "channels": {"webhook": "sent", "email": "not configured"}}) == "sent (webhook)"
    )


def test_monitoring_note_names_severity_signals_and_retraining():
    signal = {"scope": "site-d", "name": "top_feature_drift", "text": "strong shift: worst_texture (#1, p 2e-50)"}
    result = {"verdict": "drift", "severity": "critical", "retrain": True, "signals": [signal], "n_current": 400}
    note = monitoring_note(result, None, Settings(home="/tmp/x"))
    assert note.startswith("**drift** on 400 predictions")
    assert "- severity: critical; retraining requested (medops/drift)" in note
    assert "- site-d: strong shift: worst_texture (#1, p 2e-50)" in note


def test_retraining_data_is_announced_once_and_does_not_retrain_again(registry_home: Settings, monkeypatch):
    from pipelines.retraining import plan_training

    drift = "medops/drift"
    data = "medops/data"
    monkeypatch.setattr("pipelines.retraining.version_feedback", lambda settings: "data-v2")
    planned = plan_training(registry_home, triggering_events={drift: [SimpleNamespace(extra={"verdict": "drift"})]})
    assert planned["trigger"] == "drift" and planned["new_data_version"] == "data-v2"
    # The event that plan task emits schedules train_model again: that run skips, it trains nothing twice.
    own = SimpleNamespace(extra={"data_version": "data-v2", "origin": "feedback", "trained_by": "asset_triggered__1"})
    assert plan_training(registry_home, triggering_events={data: [own]}) is None
    # A hospital's batch queued with it is still trained on.
    ingest = SimpleNamespace(extra={"data_version": "data-v1"})
    again = plan_training(registry_home, triggering_events={data: [own, ingest]})
    assert again["trigger"] == "data" and again["data_version"] == "data-v1" and "new_data_version" not in again
