"""The `medops` command: same functions as the DAGs, one-line errors, non-zero exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from medops.app.cli import app
from medops.core.settings import Settings
from pipelines.data import seed_frame

runner = CliRunner()


def test_init_then_status(medops_home: Settings):
    result = runner.invoke(app, ["init"])
    assert result.exit_code == 0, result.output
    assert "data-v1" in result.output
    status = runner.invoke(app, ["status", "--json"])
    assert status.exit_code == 0, status.output
    payload = json.loads(status.stdout)
    assert payload["data_version"] == "data-v1" and payload["champion"] is None


def test_ingest_reports_counts_and_quarantine(registry_home: Settings, tmp_path: Path):
    batch = seed_frame().iloc[10:30].copy()
    batch["mean_radius"] += 0.13
    batch = batch.astype(str)
    batch.loc[12, "worst_area"] = "-5"
    path = tmp_path / "b.csv"
    batch.to_csv(path, index=False)
    result = runner.invoke(app, ["ingest", str(path), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert (payload["received"], payload["accepted"], payload["quarantined"]) == (20, 19, 1)
    assert payload["version"] == "data-v2"


def test_errors_are_one_line_with_non_zero_exit(registry_home: Settings, tmp_path: Path):
    result = runner.invoke(app, ["ingest", str(tmp_path / "missing.csv")])
    assert result.exit_code == 1
    assert "error: no such file" in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(app, ["train", "--family", "random_forest"])
    assert result.exit_code == 1
    assert "unknown model family random_forest" in result.output

    result = runner.invoke(app, ["data", "restore", "data-v7", "--to", str(tmp_path / "r")])
    assert result.exit_code == 1 and "unknown data version data-v7" in result.output


def test_data_seed_writes_the_seed(tmp_path: Path):
    result = runner.invoke(app, ["data", "seed", "--out", str(tmp_path)])
    assert result.exit_code == 0
    assert len((tmp_path / "seed.csv").read_text().splitlines()) == 570


def test_long_paths_and_urls_stay_on_one_line_when_output_is_not_a_terminal(tmp_path: Path):
    """A log or a pipe gets 80 columns from rich by default: a wrapped URL is a broken link."""
    deep = tmp_path / ("a-folder-name-long-enough-to-pass-eighty-columns-" * 3)
    result = runner.invoke(app, ["data", "seed", "--out", str(deep)])
    assert result.exit_code == 0, result.output
    assert f"wrote {deep / 'seed.csv'}" in result.stdout.splitlines()


def test_undelivered_alerts_are_listed_and_counted(medops_home: Settings):
    from medops.core.alerts import send_alert

    send_alert("Drift at site-d", "drift", ["mean_radius"], "site-d", "http://127.0.0.1:8000/projects/p", medops_home)
    listed = runner.invoke(app, ["alerts"])
    assert listed.exit_code == 0, listed.output
    assert "No alert channel is configured: set MEDOPS_ALERT_WEBHOOK_URL" in listed.stdout
    assert "Drift at site-d" in listed.stdout and "http://127.0.0.1:8000/projects/p" in listed.stdout
    as_json = json.loads(runner.invoke(app, ["alerts", "--json"]).stdout)
    assert as_json["channels"] == [] and [a["title"] for a in as_json["outbox"]] == ["Drift at site-d"]
    status = json.loads(runner.invoke(app, ["status", "--json"]).stdout)
    assert status["undelivered_alerts"] == 1 and status["alert_channels"] == []
    assert status["last_alert"]["title"] == "Drift at site-d"
    text = runner.invoke(app, ["status"]).stdout
    assert "1 undelivered alert(s)" in text and "alerts to    none" in text


def test_every_option_has_help():
    import typer.main

    missing = []

    def walk(group, path: str) -> None:
        for name, command in getattr(group, "commands", {}).items():
            walk(command, f"{path} {name}")
        for param in getattr(group, "params", []):
            if param.param_type_name == "option" and not param.help:
                missing.append(f"{path} {param.opts[0]}")

    walk(typer.main.get_command(app), "medops")
    assert missing == []


def test_drift_scenario_says_why_the_model_was_not_renewed_and_exits_non_zero(medops_home: Settings, monkeypatch):
    from types import SimpleNamespace

    from medops.app import platform

    state = SimpleNamespace(value="success")
    run = SimpleNamespace(dag_run_id="asset_triggered__2026-11-30", state=state)

    class FakeAirflow:
        def __init__(self):
            self.listed = 0

        def runs(self, dag_id):
            self.listed += 1
            return [run] if dag_id == "train_model" and self.listed > 1 else []

        def trigger(self, dag_id, conf):
            return "manual__1"

        def wait_for_run(self, dag_id, run_id, timeout):
            return SimpleNamespace(state=state)

        def xcom(self, dag_id, run_id, task_id):
            if task_id == "check_drift":
                return {
                    "verdict": "drift",
                    "severity": "critical",
                    "retrain": True,
                    "drifted_columns": ["mean_area"],
                    "report_url": "http://r/1",
                }
            return {"sent": False, "channels": {"webhook": "not configured", "email": "not configured"}, "outbox": "o"}

        def close(self):
            pass

    sent = SimpleNamespace(scored=400, feedback_sent=400, rejected=0)
    monkeypatch.setattr(platform, "serving_version", lambda settings: "1")
    monkeypatch.setattr(platform, "airflow_client", lambda settings: FakeAirflow())
    monkeypatch.setattr("medops.app.simulate.simulate", lambda *a, **k: sent)
    monkeypatch.setattr("pipelines.model_registry.champion_version", lambda settings: "1")
    monkeypatch.setattr("pipelines.model_registry.alias_version", lambda alias, settings: "2")
    tags = {"gate_decision": "rejected", "gate_passed": "false", "roc_auc": "0.9612", "sensitivity": "0.9400"}
    tags["gate_reasons"] = json.dumps(["site-d specificity 0.685 below 0.80"])
    monkeypatch.setattr("pipelines.model_registry.version_tags", lambda version, settings: tags)
    result = runner.invoke(app, ["drift-scenario", "--records", "400"])
    assert result.exit_code == 1
    assert "model not renewed: the gate refused v2 (ROC AUC 0.9612, sensitivity 0.9400)" in result.stderr
    assert "site-d specificity 0.685 below 0.80" in result.stderr
    assert "/#/models/breast_cancer_diagnosis/versions/2" in result.stderr and "next:" in result.stderr
    assert "NOT DELIVERED" in result.stderr
