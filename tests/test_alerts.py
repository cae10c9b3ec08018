"""Alerts reach a local webhook sink and a local SMTP sink, are deduplicated, and never raise."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from medops.core.alerts import configured_channels, outbox_alerts, send_alert
from medops.core.settings import Settings, get_settings, reset_settings
from medops.orchestration import DEFAULT_ARGS, MedopsNotifier, notify_task_failure


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def webhook() -> Iterator[SimpleNamespace]:
    """A Slack-like webhook on a free loopback port; ``received`` holds the JSON bodies."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="webhook-sink", daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}/hooks/alerts", received=received)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def smtp() -> Iterator[SimpleNamespace]:
    """An aiosmtpd SMTP server on a free loopback port; ``received`` holds the parsed messages."""
    from aiosmtpd.controller import Controller

    received: list = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's hook name)
            received.append(message_from_bytes(envelope.content))
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield SimpleNamespace(port=controller.port, received=received)
    finally:
        controller.stop()


@pytest.fixture
def alerting(medops_home: Settings, webhook, smtp, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("MEDOPS_ALERT_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("MEDOPS_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("MEDOPS_SMTP_PORT", str(smtp.port))
    monkeypatch.setenv("MEDOPS_ALERT_EMAIL_TO", "oncall@hospital.example, ml@hospital.example")
    monkeypatch.setenv("MEDOPS_ALERT_DEDUP_MINUTES", "30")
    reset_settings()
    return get_settings()


COLUMNS = ["mean_radius", "worst_area"]
REPORT = "http://127.0.0.1:8000/projects/p/reports/r"


def test_drift_alert_reaches_webhook_and_email(alerting, webhook, smtp):
    outcome = send_alert("Drift at site-b", "drift", COLUMNS, "site-b", REPORT, alerting, severity="warning")
    assert outcome.sent and outcome.channels == {"webhook": "sent", "email": "sent"}

    (payload,) = webhook.received
    assert "Drift at site-b" in payload["text"] and REPORT in payload["text"]
    assert payload["blocks"][0] == {"type": "header", "text": {"type": "plain_text", "text": "Drift at site-b"}}
    fields = " ".join(field["text"] for field in payload["blocks"][1]["fields"])
    assert "drift" in fields and "site-b" in fields and "mean_radius, worst_area" in fields and "warning" in fields
    assert any(REPORT in json.dumps(block) for block in payload["blocks"][2:])

    (mail,) = smtp.received
    assert mail["Subject"] == "[medops][warning] Drift at site-b"
    assert mail["To"] == "oncall@hospital.example, ml@hospital.example"
    assert mail["From"] == alerting.alert_email_from
    body = mail.get_payload()
    assert "Verdict: drift" in body and "Site: site-b" in body and "mean_radius, worst_area" in body
    assert REPORT in body


def test_identical_alert_within_the_window_is_sent_once(alerting, webhook, smtp):
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    first = send_alert("Drift", "drift", COLUMNS, "site-b", REPORT, alerting, now=start)
    again = send_alert(
        "Drift", "drift", COLUMNS[::-1], "site-b", REPORT + "?x", alerting, now=start + timedelta(minutes=10)
    )
    other = send_alert(
        "Drift", "drift", ["mean_texture"], "site-b", REPORT, alerting, now=start + timedelta(minutes=11)
    )
    later = send_alert("Drift", "drift", COLUMNS, "site-b", REPORT, alerting, now=start + timedelta(minutes=31))
    assert first.sent and not first.deduplicated
    assert again.deduplicated and not again.sent  # same columns in another order, another report link
    assert again.channels == {"webhook": "deduplicated", "email": "deduplicated"}
    assert other.sent and later.sent
    assert len(webhook.received) == 3 and len(smtp.received) == 3
    assert (alerting.home / "state" / "alerts.json").exists()


def test_a_failing_channel_is_reported_not_raised_and_retried(alerting, webhook, monkeypatch, caplog):
    monkeypatch.setenv("MEDOPS_SMTP_PORT", str(free_port()))  # nothing listens there
    reset_settings()
    settings = get_settings()
    with caplog.at_level(logging.INFO, logger="medops.core.alerts"):
        outcome = send_alert("Drift", "drift", COLUMNS, None, REPORT, settings)
    assert outcome.sent and outcome.channels["webhook"] == "sent"
    assert outcome.channels["email"].startswith("failed:")
    failures = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(failures) == 1, "a failed delivery is one ERROR line"
    assert "'Drift' not delivered by email: ConnectionRefusedError" in failures[0].getMessage()

    monkeypatch.setenv("MEDOPS_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{free_port()}/down")
    reset_settings()
    broken = get_settings()
    first = send_alert("Other", "drift", COLUMNS, None, REPORT, broken)
    second = send_alert("Other", "drift", COLUMNS, None, REPORT, broken)
    assert not first.sent and not second.deduplicated  # nothing went out, so nothing is suppressed


def test_without_channels_nothing_is_sent_and_the_alert_waits_in_the_outbox(medops_home):
    outcome = send_alert("Drift", "drift", COLUMNS, None, REPORT, medops_home)
    assert not outcome.sent and not outcome.deduplicated
    assert outcome.channels == {"webhook": "not configured", "email": "not configured"}
    waiting = Path(outcome.outbox)
    assert waiting.parent == medops_home.home / "alerts" / "outbox"
    assert waiting.stat().st_mode & 0o777 == 0o600
    (listed,) = outbox_alerts(medops_home)
    assert listed["title"] == "Drift" and listed["report_url"] == REPORT and listed["path"] == str(waiting)
    assert configured_channels(medops_home) == []


def test_an_alert_every_channel_failed_waits_in_the_outbox(alerting, monkeypatch):
    monkeypatch.setenv("MEDOPS_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{free_port()}/down")
    monkeypatch.setenv("MEDOPS_SMTP_PORT", str(free_port()))
    reset_settings()
    outcome = send_alert("Drift", "drift", COLUMNS, "site-d", REPORT, get_settings())
    assert not outcome.sent and not outcome.deduplicated and outcome.outbox
    assert all(state.startswith("failed") for state in outcome.channels.values())
    (listed,) = outbox_alerts(get_settings())
    assert listed["site"] == "site-d" and listed["channels"] == outcome.channels


def test_a_delivered_alert_leaves_the_outbox_empty(alerting, webhook, smtp):
    outcome = send_alert("Drift", "drift", COLUMNS, None, REPORT, alerting)
    assert outcome.sent and outcome.outbox is None
    assert outbox_alerts(alerting) == []


def test_failure_notifier_alerts_through_the_same_channels(alerting, webhook, smtp):
    ti = SimpleNamespace(
        dag_id="train_model", task_id="train", run_id="manual__1", log_url="http://127.0.0.1:8080/dags/x"
    )
    notifier = DEFAULT_ARGS["on_failure_callback"]
    assert isinstance(notifier, MedopsNotifier)
    notifier({"ti": ti, "exception": ValueError("gate config is broken\nsecond line")})
    (payload,) = webhook.received
    assert payload["blocks"][0]["text"]["text"] == "train_model.train failed"
    assert "ValueError: gate config is broken" in json.dumps(payload)
    assert "http://127.0.0.1:8080/dags/x" in payload["text"]
    assert smtp.received[0]["Subject"] == "[medops][error] train_model.train failed"


def test_failure_alert_never_raises_on_an_odd_context(alerting):
    outcome = notify_task_failure({"dag": None, "reason": "task_failure"})
    assert outcome.sent  # "unknown DAG failed" still reaches people
    assert notify_task_failure(None).sent is False  # type: ignore[arg-type]


def _verdict(verdict: str, severity: str, retrain: bool, p_value: float, share: float) -> dict:
    """A monitoring result as the DAG passes it between tasks, with two fired signals at site-x."""
    return {
        "verdict": verdict,
        "severity": severity,
        "retrain": retrain,
        "sites": ["site-x"],
        "model_version": "3",
        "drifted_columns": ["worst_radius", "worst_texture"],
        "report_url": REPORT,
        "signals": [
            {
                "scope": "site-x",
                "name": "prediction_drift",
                "severity": "critical",
                "text": f"probability_malignant shifted (ks {p_value:.2g}, p <= 1e-06; moved 0.61 sd)",
            },
            {
                "scope": "site-x",
                "name": "important_feature_drift",
                "severity": "critical",
                "text": f"features carrying {share:.0%} of the model's weight drifted (worst_radius, worst_texture)",
            },
        ],
    }


def test_verdict_alert_says_where_what_and_what_happens_next(alerting, webhook, smtp):
    from monitoring.reports import alert_for_result

    first = alert_for_result(_verdict("drift", "critical", True, 3e-12, 0.31), alerting)
    assert first["sent"] is True
    (payload,) = webhook.received
    text = json.dumps(payload)
    assert "site-x" in text and "critical" in text
    assert "prediction_drift" in text and "3e-12" in text and "31%" in text
    assert "Retraining scheduled" in text and REPORT in text
    # The same incident with other figures next hour is not sent again.
    again = alert_for_result(_verdict("drift", "critical", True, 1e-9, 0.27), alerting)
    assert again["deduplicated"] is True and len(webhook.received) == 1
    assert alert_for_result(_verdict("no_drift", None, False, 0.4, 0.0), alerting) is None


def test_data_quality_and_warning_alerts_say_no_retraining(alerting, webhook):
    from monitoring.reports import alert_for_result

    alert_for_result(_verdict("data_quality", "critical", False, 0.3, 0.0), alerting)
    alert_for_result(_verdict("drift", "warning", False, 0.3, 0.1), alerting)
    quality, warning = (json.dumps(payload) for payload in webhook.received)
    assert "Nothing automatic" in quality and "Retraining scheduled" not in quality
    assert "No retraining" in warning


def test_verdict_alert_mentions_cooldown_and_approval(alerting, webhook, monkeypatch):
    from monitoring.reports import alert_for_result

    state = alerting.home / "state" / "retraining.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"last_drift_retraining": datetime.now(UTC).isoformat()}))
    alert_for_result(_verdict("drift", "critical", True, 1e-12, 0.3), alerting)
    assert "inside the 6 h cooldown" in json.dumps(webhook.received[-1])
    state.unlink()
    monkeypatch.setenv("MEDOPS_REQUIRE_APPROVAL", "true")
    reset_settings()
    alert_for_result(_verdict("performance_drop", "critical", True, 1e-12, 0.3), get_settings())
    assert "waits for approval" in json.dumps(webhook.received[-1])
