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
