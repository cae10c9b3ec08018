"""The whole loop on real processes, driven only through public interfaces.

`medops up` on a temporary MEDOPS_HOME and free loopback ports starts Airflow's four components
(LocalExecutor, SQLite), the MLflow UI, the Evidently UI and (through the DAGs) the served champion.
The test then talks to Airflow's REST API, the service's HTTP contract and the MLflow client,
exactly as people and clinical apps do: seed lands -> champion v1 serving -> undrifted traffic: no_drift, no alert ->
one site whose calibration moved the champion's three most important features (3 of 30 columns:
the column-count rule alone says no_drift) -> drift, critical -> alert at the webhook and SMTP
sinks naming the site and the signals -> train_model runs from the drift Asset -> a new champion
is deployed and X-Model-Version changes on the serving port, while a separate process keeps
calling /predict and sees no failed request. Every door stays locked throughout: no socket off
loopback, MLflow's REST API refuses anyone without its password, no password or key in any file or
in what `up` printed, nothing under MEDOPS_HOME readable by other users. Nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from medops.core.processes import poll_until, wait_until
from pipelines.data import seed_frame
from pipelines.schema import FEATURES
from serving.client import MedopsClient, ServiceError
from tests import test_platform_doors as doors
from tests.test_alerts import smtp, webhook  # noqa: F401  (fixtures: local alert sinks)

if TYPE_CHECKING:
    from airflow_client.client.models import DAGRunResponse

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _medops(env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "medops"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"medops {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _steady_load(url: str, key: str, record: dict, stop, counts) -> None:
    """Another process calling /predict back to back, as a clinical app would, counting failures."""
    # no connection retries: a connection refused during the rollout must count as a failure
    with MedopsClient(url, key, timeout=30, connect_retries=0) as client:
        while not stop.is_set():
            try:
                client.predict([record])
                ok = True
            except (httpx.HTTPError, ServiceError):
                ok = False
            with counts.get_lock():
                counts[0 if ok else 1] += 1
            time.sleep(0.05)


class Stages:
    def __init__(self) -> None:
        self.started = self.last = time.monotonic()
        self.durations: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.durations[name] = round(now - self.last, 1)
        self.last = now

    def report(self) -> str:
        total = round(time.monotonic() - self.started, 1)
        return json.dumps({"total_seconds": total, "stages_seconds": self.durations}, indent=1)


def _wait(check, timeout: float, what: str, poll: float = 2.0):
    return wait_until(check, timeout, what, poll=poll, hint="the test's MEDOPS_HOME/run/ holds the logs")


def _platform_processes(home: Path) -> list[int]:
    """Processes whose environment names this test's MEDOPS_HOME (everything the platform started)."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if process.environ().get("MEDOPS_HOME") == str(home) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _monitor(airflow, since: str) -> dict:
    """Run monitor_drift over the traffic sent since ``since`` and return check_drift's result."""
    run_id = airflow.trigger("monitor_drift", {"since": since})
    assert airflow.wait_for_run("monitor_drift", run_id, timeout=300).state.value == "success"
    value = airflow.xcom("monitor_drift", run_id, "check_drift")
    assert isinstance(value, dict), value
    return value


def _describe(pids: list[int]) -> str:
    import psutil

    lines = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            lines.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())[:200]}")
    return "left running: " + "; ".join(lines)


SHIFTED_FEATURES = 3
SHIFT_FACTOR = 1.4


def _top_features(client, run_id: str) -> list[str]:
    """The champion's most important features, as its training run stored them."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "reference/importance.json", tmp)
        importance = json.loads(Path(path).read_text())["importance"]
    return sorted(importance, key=lambda name: -importance[name])[:SHIFTED_FEATURES]


def _send_recalibrated_site(serving: str, site: str, records: int, features: list[str]) -> None:
    """Realistic cases from ``site`` whose imaging reads ``features`` SHIFT_FACTOR too high, then their labels."""
    import numpy as np

    from medops.app.simulate import traffic
    from pipelines.schema import ENCOUNTER, FEATURE_RANGES, LABEL, SITE

    cases = traffic(site, records, seed=20261)
    for name in features:
        cases[name] = np.clip(cases[name] * SHIFT_FACTOR, *FEATURE_RANGES[name])
    columns = [*FEATURES, ENCOUNTER, SITE]
    with MedopsClient(serving, "e2e-key", timeout=30) as service:
        for start in range(0, records, 50):
            service.predict(cases[columns].iloc[start : start + 50].to_dict(orient="records"))
        labels = list(zip(cases[ENCOUNTER], cases[LABEL], strict=True))
        for start in range(0, records, 50):
            service.feedback(labels[start : start + 50])


def assert_doors_locked(home: Path, mlflow_url: str, secrets: list[str], printed: str) -> None:
    """The platform's doors, checked on the running platform (both profiles' end-to-end tests)."""
    from medops.core.settings import Settings

    assert not [secret for secret in secrets if secret in printed], "`medops up` printed a password or key"
    doors.assert_listening_on_loopback_only(home)
    doors.assert_mlflow_asks_for_a_password(mlflow_url, Settings(home=home).mlflow_credentials(), MODEL)
    doors.assert_no_secret_in_files(home, secrets)
    doors.assert_nothing_readable_by_others(home)


def platform_secrets(home: Path, api_keys: list[str]) -> list[str]:
    """Airflow's and MLflow's admin passwords and every API key: ``api_keys`` and those medops made."""
    from medops.app.airflow_api import admin_password
    from medops.core.settings import Settings

    settings = Settings(home=home)
    made = [(settings.secrets_dir / name).read_text().strip() for name in ("api_key", "rollout_key")
            if (settings.secrets_dir / name).exists()]  # fmt: skip
    return [admin_password(settings), settings.mlflow_credentials()["MLFLOW_TRACKING_PASSWORD"], *api_keys, *made]


MODEL = "breast_cancer_diagnosis"


def test_the_loop_end_to_end(tmp_path: Path, webhook, smtp, capsys, monkeypatch):  # noqa: F811
    from medops.app.airflow_api import AirflowClient, admin_password
    from medops.core.settings import Settings

    home = tmp_path / "medops-home"
    ports = {name: _free_port() for name in ("AIRFLOW", "MLFLOW", "SERVING", "EVIDENTLY")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDOPS_", "AIRFLOW"))}
    env.update({f"MEDOPS_{name}_PORT": str(port) for name, port in ports.items()})
    env.update(
        {
            "MEDOPS_HOME": str(home),
            "MEDOPS_API_KEYS": "e2e-key",
            "MEDOPS_ALERT_WEBHOOK_URL": webhook.url,
            "MEDOPS_SMTP_HOST": "127.0.0.1",
            "MEDOPS_SMTP_PORT": str(smtp.port),
            "MEDOPS_ALERT_EMAIL_TO": "oncall@hospital.example",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        }
    )
    serving = f"http://127.0.0.1:{ports['SERVING']}"
    stages = Stages()
    airflow = None
    try:
        # 1. make run's command: platform up, seed lands, champion v1 serving.
        up = _medops(env, "up")
        stages.done("up: seed lands -> champion v1 serving")
        settings = Settings(home=home)
        airflow = AirflowClient(f"http://127.0.0.1:{ports['AIRFLOW']}", password=admin_password(settings))
        for dag_id in ("ingest_data", "train_model", "deploy_model"):
            assert [r.state.value for r in airflow.runs(dag_id)] == ["success"], dag_id
        with MedopsClient(serving, "e2e-key", timeout=10) as service:
            assert service.metadata().model_version == "1" and service.last_model_version == "1"

        import mlflow

        mlflow_url = f"http://127.0.0.1:{ports['MLFLOW']}"
        secrets = platform_secrets(home, ["e2e-key"])
        assert_doors_locked(home, mlflow_url, secrets, up.stdout + up.stderr)
        stages.done("doors locked")
        for name, value in settings.mlflow_credentials().items():  # the MLflow UI's REST API asks for them
            monkeypatch.setenv(name, value)
        client = mlflow.MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
        champion = client.get_model_version_by_alias("breast_cancer_diagnosis", "champion")
        assert champion.version == "1" and champion.tags["data_version"] == "data-v1"
        assert client.get_run(champion.run_id).data.tags["data_version"] == "data-v1"

        # 2. undrifted traffic: no_drift, and nobody is woken up.
        # Each manual run names its window, so the hourly run (its first one starts on unpause, or at
        # the top of the hour) cannot take the traffic away from it.
        window = datetime.now(UTC).isoformat()
        _medops(env, "simulate", "--site", "site-a", "--records", "300", "--json")
        verdict = _monitor(airflow, since=window)
        assert verdict["verdict"] == "no_drift", verdict
        assert webhook.received == [] and smtp.received == []
        stages.done("undrifted traffic -> no_drift, no alert")

        # 3. drifted traffic with labels from the hospital, under continuous load from another process.
        stop, counts = multiprocessing.Event(), multiprocessing.Array("i", 2)
        row = seed_frame().iloc[5]
        record = {name: float(row[name]) for name in FEATURES}
        load = multiprocessing.Process(
            target=_steady_load, args=(serving, "e2e-key", record, stop, counts), daemon=True
        )
        load.start()
        try:
            window = datetime.now(UTC).isoformat()
            shifted = _top_features(client, champion.run_id)
            _send_recalibrated_site(serving, "site-d", 400, shifted)
            verdict = _monitor(airflow, since=window)
            assert verdict["verdict"] == "drift" and verdict["severity"] == "critical", verdict
            assert verdict["retrain"] is True and "site-d" in verdict["sites"], verdict
            fired = {signal["name"] for signal in verdict["signals"] if signal["scope"] == "site-d"}
            assert fired & {"prediction_drift", "important_feature_drift", "top_feature_drift"}, verdict
            assert "column_share_drift" not in fired, verdict  # the column count alone saw nothing at site-d
            stages.done("one site's top features recalibrated -> drift, critical")

            _wait(lambda: webhook.received and smtp.received, 60, "the drift alert at both sinks")
            alert = json.dumps(webhook.received[0])
            assert "drift" in alert and "site-d" in alert and "critical" in alert
            assert all(name in alert for name in fired), alert
            assert "Retraining scheduled" in alert
            assert "sim-site-d" not in alert  # no encounter ids in alerts
            assert "drift" in smtp.received[0]["Subject"].lower()
            stages.done("alert at webhook and SMTP")

            def drift_training() -> DAGRunResponse | None:
                runs = airflow.runs("train_model")  # newest first; the oldest one trained v1
                done = [r for r in runs[:-1] if r.state.value in ("success", "failed")]
                return done[0] if done else None

            assert _wait(drift_training, 420, "train_model run from medops/drift").state.value == "success"

            def serving_new_version() -> str | None:
                version = httpx.get(f"{serving}/livez", timeout=5).headers.get("x-model-version")
                return version if version not in (None, "1") else None

            new = _wait(serving_new_version, 420, "a new champion serving")
            stages.done("retrain from drift Asset -> new champion serving")
        finally:
            stop.set()
            load.join(timeout=60)
        served, failed = counts[0], counts[1]
        assert served > 20 and failed == 0, f"{failed} failed of {served + failed} requests during the rollout"
        champion = client.get_model_version_by_alias("breast_cancer_diagnosis", "champion")
        assert champion.version == new
        seen = client.get_run(champion.run_id).data.tags["data_versions_seen"].split(",")
        assert len(seen) >= 2, seen  # the drifted site's labelled cases became a data version
        # After a retraining, a rollout and an alert: still no socket off loopback, no secret in a file.
        assert_doors_locked(home, mlflow_url, secrets, "")
    finally:
        if airflow is not None:
            airflow.close()
        subprocess.run([str(BIN / "medops"), "down"], env=env, capture_output=True, timeout=180)
        with capsys.disabled():
            print("\nend-to-end stages:", stages.report())
    poll_until(lambda: not _platform_processes(home), 60, 1.0)
    assert _platform_processes(home) == [], _describe(_platform_processes(home))
