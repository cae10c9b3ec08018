"""Alerts for on-call people: a webhook in Slack's JSON shape and e-mail, both optional, deduplicated.

An identical alert sent within ``alert_dedup_minutes`` is not sent again (the record lives in
``MEDOPS_HOME/state/alerts.json``). A failing channel is an ERROR log line and a state in the
returned :class:`AlertOutcome`, never an exception: a broken mail server must not fail a DAG run.
No alert is silent: one no channel delivered waits in ``MEDOPS_HOME/alerts/outbox/`` (0600), which
``medops alerts`` lists. Only the standard library at the top: DAG files import this when parsed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import smtplib
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medops.core.files import file_lock, write_atomically

if TYPE_CHECKING:
    from medops.core.settings import Settings

log = logging.getLogger(__name__)

SEVERITIES = ("info", "warning", "error", "critical")
_EMOJI = {"info": ":information_source:", "warning": ":warning:", "error": ":x:", "critical": ":rotating_light:"}
_TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class AlertOutcome:
    """What happened to one alert: per channel ``sent``, ``failed: <reason>`` or ``not configured``."""

    sent: bool
    deduplicated: bool = False
    channels: dict[str, str] = field(default_factory=dict)
    outbox: str | None = None  # the file the alert waits in when no channel delivered it


def send_alert(
    title: str,
    verdict: str,
    drifted_columns: Sequence[str],
    site: str | None,
    report_url: str | None,
    settings: Settings | None = None,
    *,
    severity: str = "warning",
    details: str | None = None,
    now: datetime | None = None,
    dedup_key: str | None = None,
) -> AlertOutcome:
    """Send one alert to the configured webhook and e-mail recipients, unless sent just before.

    ``site`` names the hospital(s) concerned (None: all). ``dedup_key`` stands for the columns and
    ``details`` in what makes two alerts identical (figures that change every run would never match).
    Returns what each channel did; never raises.
    """
    try:
        from medops.core.settings import get_settings

        settings = settings or get_settings()
        if severity not in SEVERITIES:
            severity = "warning"
        now = now or datetime.now(UTC)
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        alert = _Alert(title, verdict, tuple(drifted_columns), site, report_url, severity, details, dedup_key)
        channels = {
            "webhook": "not configured" if not settings.alert_webhook_url else "",
            "email": "not configured" if not (settings.smtp_host and settings.alert_email_to) else "",
        }
        if all(channels.values()):
            path = _to_outbox(alert, channels, settings, now)
            log.warning(
                "alert not delivered: no channel configured (set MEDOPS_ALERT_WEBHOOK_URL, or MEDOPS_SMTP_HOST "
                "with MEDOPS_ALERT_EMAIL_TO); kept in the outbox %s: %s",
                path,
                title,
            )
            return AlertOutcome(sent=False, channels=channels, outbox=str(path))
        with _DedupState(settings) as state:
            if state.sent_recently(alert.fingerprint, now, settings.alert_dedup_minutes):
                log.info("alert not sent again within %s min: %s", settings.alert_dedup_minutes, title)
                skipped = {name: state or "deduplicated" for name, state in channels.items()}
                return AlertOutcome(sent=False, deduplicated=True, channels=skipped)
            for name, channel in (("webhook", post_webhook), ("email", send_email)):
                if not channels[name]:
                    channels[name] = _deliver(name, channel, alert, settings)
            sent = "sent" in channels.values()
            if sent:  # a failed delivery is retried next time rather than suppressed
                state.record(alert.fingerprint, now)
        outbox = None if sent else str(_to_outbox(alert, channels, settings, now))
        return AlertOutcome(sent=sent, channels=channels, outbox=outbox)
    except Exception as error:  # an alert must never take its caller down
        log.exception("alert %r could not be sent: %s", title, error)
        return AlertOutcome(sent=False, channels={"error": f"failed: {error}"})


@dataclass(frozen=True)
class _Alert:
    title: str
    verdict: str
    drifted_columns: tuple[str, ...]
    site: str | None
    report_url: str | None
    severity: str
    details: str | None
    dedup_key: str | None = None

    @property
    def fingerprint(self) -> str:
        if self.dedup_key is not None:
            key = [self.title, self.verdict, self.site, self.severity, self.dedup_key]
        else:
            key = [self.title, self.verdict, sorted(self.drifted_columns), self.site, self.severity, self.details]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]

    def columns_text(self, limit: int = 12) -> str:
        if not self.drifted_columns:
            return "none"
        shown = ", ".join(self.drifted_columns[:limit])
        more = len(self.drifted_columns) - limit
        return f"{shown} (+{more} more)" if more > 0 else shown

    def text(self) -> str:
        lines = [
            f"[{self.severity.upper()}] {self.title}",
            f"Verdict: {self.verdict}",
            f"Site: {self.site or 'all sites'}",
            f"Drifted columns: {self.columns_text()}",
        ]
        if self.details:
            lines.append(self.details)
        if self.report_url:
            lines.append(f"Report: {self.report_url}")
        return "\n".join(lines)


def outbox_dir(settings: Settings) -> Path:
    return settings.home / "alerts" / "outbox"


def _to_outbox(alert: _Alert, channels: dict[str, str], settings: Settings, now: datetime) -> Path:
    record = {
        "time": now.isoformat(),
        "title": alert.title,
        "verdict": alert.verdict,
        "severity": alert.severity,
        "site": alert.site,
        "drifted_columns": list(alert.drifted_columns),
        "details": alert.details,
        "report_url": alert.report_url,
        "channels": channels,
        "text": alert.text(),
    }
    name = f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{alert.fingerprint[:12]}.json"
    return write_atomically(outbox_dir(settings) / name, json.dumps(record, indent=1) + "\n", mode=0o600)


def outbox_alerts(settings: Settings) -> list[dict[str, Any]]:
    """Alerts no channel delivered, newest first, each with the ``path`` of its file."""
    alerts = []
    for path in sorted(outbox_dir(settings).glob("*.json"), reverse=True):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            record = {"title": f"unreadable outbox file: {error}"}
        alerts.append({**record, "path": str(path)})
    return alerts


def sent_alerts(settings: Settings) -> list[str]:
    """When alerts went out (the deduplication record, a week deep), oldest first."""
    path = settings.home / "state" / "alerts.json"
    try:
        return sorted(json.loads(path.read_text()).values()) if path.exists() else []
    except (OSError, ValueError):
        return []


def configured_channels(settings: Settings) -> list[str]:
    """The alert channels settings name (empty: alerts go to the outbox only)."""
    channels = []
    if settings.alert_webhook_url:
        channels.append("webhook")
    if settings.smtp_host and settings.alert_email_to:
        channels.append(f"email to {settings.alert_email_to}")
    return channels


def _deliver(name: str, channel: Any, alert: _Alert, settings: Settings) -> str:
    try:
        channel(alert, settings)
    except Exception as error:
        # an alert nobody received is an incident of its own: say loudly which channel and why
        log.error("alert %r not delivered by %s: %s: %s", alert.title, name, type(error).__name__, error)
        return f"failed: {error}"
    return "sent"


def slack_payload(alert: _Alert) -> dict[str, Any]:
    """Slack's message shape: ``text`` for notifications and clients without blocks, then blocks."""
    fields = [
        {"type": "mrkdwn", "text": f"*Verdict*\n{alert.verdict}"},
        {"type": "mrkdwn", "text": f"*Severity*\n{alert.severity}"},
        {"type": "mrkdwn", "text": f"*Site*\n{alert.site or 'all sites'}"},
        {"type": "mrkdwn", "text": f"*Drifted columns*\n{alert.columns_text()}"},
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": alert.title[:150]}},
        {"type": "section", "fields": fields},
    ]
    if alert.details:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": alert.details[:2900]}})
    if alert.report_url:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"<{alert.report_url}|Open the report>"}})
    text = f"{_EMOJI[alert.severity]} {alert.title}: {alert.verdict}"
    if alert.report_url:
        text += f" ({alert.report_url})"
    return {"text": text, "blocks": blocks}


def post_webhook(alert: _Alert, settings: Settings) -> None:
    body = json.dumps(slack_payload(alert)).encode()
    request = urllib.request.Request(
        settings.alert_webhook_url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=_TIMEOUT_SECONDS) as response:
        if response.status >= 300:
            raise RuntimeError(f"webhook answered HTTP {response.status}")


def send_email(alert: _Alert, settings: Settings) -> None:
    message = EmailMessage()
    message["Subject"] = f"[medops][{alert.severity}] {alert.title}"
    message["From"] = settings.alert_email_from
    message["To"] = ", ".join(address.strip() for address in settings.alert_email_to.split(",") if address.strip())
    message.set_content(alert.text() + "\n")
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=_TIMEOUT_SECONDS) as smtp:
        smtp.send_message(message)


class _DedupState:
    """What was sent when, in ``MEDOPS_HOME/state/alerts.json``, behind a lock shared by processes."""

    def __init__(self, settings: Settings):
        self.path = settings.home / "state" / "alerts.json"
        self.keep = timedelta(minutes=max(settings.alert_dedup_minutes, 7 * 24 * 60))
        self.sent: dict[str, str] = {}

    def __enter__(self) -> _DedupState:
        self._lock = file_lock(self.path.with_name(self.path.name + ".lock"), timeout=30)
        self._lock.acquire()
        try:
            self.sent = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError):
            self.sent = {}  # a damaged record means at worst one duplicate alert
        self._dirty = False
        return self

    def sent_recently(self, fingerprint: str, now: datetime, minutes: float) -> bool:
        last = self.sent.get(fingerprint)
        return bool(last) and now - datetime.fromisoformat(last) < timedelta(minutes=minutes)

    def record(self, fingerprint: str, now: datetime) -> None:
        oldest = now - self.keep
        self.sent = {key: at for key, at in self.sent.items() if datetime.fromisoformat(at) > oldest}
        self.sent[fingerprint] = now.isoformat()
        self._dirty = True

    def __exit__(self, *exc: object) -> None:
        try:
            if self._dirty:
                write_atomically(self.path, json.dumps(self.sent, indent=1) + "\n")
        finally:
            self._lock.release()
