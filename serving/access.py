"""Per-key request limits, request ids and the access log of a serving worker.

Limits (:class:`Limiter`): a token bucket (sustained rate, burst) and a cap on requests in progress,
per API key, with stricter figures for /explain (a 1,000-record shap explanation costs seconds of
CPU). They hold per worker process: a server with N workers admits up to N times the figures, which
is enough to keep one key from starving the others without a shared store on the hot path.

Access log (:class:`AccessLog`): one JSON line per request, refused ones included, in
``MEDOPS_HOME/run/access-<pid>.log``: time, request id, key id (never the key), method, route,
status, record count (when the body was parsed), site, duration. Never a feature value, never an
identifier: routes outside the contract are logged as ``other`` (a path could carry anything).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger("medops.serving")

REQUEST_ID_HEADER = b"x-request-id"
# Accepted from a client only in this shape: it goes into log lines and the prediction log's CSV.
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
REQUEST_STATE = "medops_request"  # key of the RequestInfo in the ASGI scope's "state"
LOGGED_ROUTES = frozenset(
    {"/predict", "/explain", "/feedback", "/metadata", "/model-card", "/livez", "/readyz", "/healthz", "/metrics"}
    | {"/docs.json", "/docs", "/", "/schema.json"}
)


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-Id`` if it is a safe token, else a new random one."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if _CLIENT_REQUEST_ID.fullmatch(value):
                return value.decode()
            break
    return os.urandom(16).hex()


@dataclass
class RequestInfo:
    """What the access log records of one request; the service fills in ``records``."""

    request_id: str
    key_id: str | None = None
    site: str | None = None
    records: int | None = None
    status: int | None = None


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    in_flight: int = 0


@dataclass(frozen=True)
class Limits:
    rate: float  # requests per second, sustained (0: no rate limit)
    burst: int
    concurrency: int  # requests in progress at once (0: no limit)


class Limiter:
    """Token bucket and concurrency cap per (key, class of route); event-loop only (no locking)."""

    def __init__(self, default: Limits, explain: Limits, *, clock=time.monotonic) -> None:
        self.classes = {"default": default, "explain": explain}
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._clock = clock

    @staticmethod
    def route_class(path: str) -> str:
        return "explain" if path == "/explain" else "default"

    def admit(self, key_id: str, path: str) -> tuple[str, int] | None:
        """None if the request may go ahead (it then counts as in progress until :meth:`release`),
        else (why, seconds to wait before retrying)."""
        kind = self.route_class(path)
        limits = self.classes[kind]
        now = self._clock()
        bucket = self._buckets.get((key_id, kind))
        if bucket is None:
            bucket = self._buckets[(key_id, kind)] = _Bucket(max(limits.burst, 1), now)
        if limits.concurrency and bucket.in_flight >= limits.concurrency:
            return f"more than {limits.concurrency} requests of this key in progress at once", 1
        if limits.rate > 0:
            bucket.tokens = min(max(limits.burst, 1), bucket.tokens + (now - bucket.stamp) * limits.rate)
            bucket.stamp = now
            if bucket.tokens < 1:
                why = f"more than {limits.rate:g} requests per second (burst {limits.burst}) for this key"
                return why, max(math.ceil((1 - bucket.tokens) / limits.rate), 1)
            bucket.tokens -= 1
        bucket.in_flight += 1
        return None

    def release(self, key_id: str, path: str) -> None:
        bucket = self._buckets.get((key_id, self.route_class(path)))
        if bucket is not None and bucket.in_flight > 0:
            bucket.in_flight -= 1


def limiter_from_settings(settings) -> Limiter:
    return Limiter(
        Limits(settings.rate_limit_per_second, settings.rate_limit_burst, settings.concurrency_limit),
        Limits(
            settings.explain_rate_limit_per_second,
            settings.explain_rate_limit_burst,
            settings.explain_concurrency_limit,
        ),
    )


class AccessLog:
    """Appends one JSON line per request to ``<directory>/access-<pid>.log`` (0600, one write per line)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._fd: int | None = None
        self._pid = 0
        self._failed = False

    def _descriptor(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:  # a forked worker writes a file of its own
            self.directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.directory / f"access-{pid}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._pid = pid
        return self._fd

    def write(self, method: str, path: str, info: RequestInfo, seconds: float) -> None:
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": info.request_id,
            "key_id": info.key_id,
            "method": method,
            "route": path if path in LOGGED_ROUTES else "other",
            "status": info.status if info.status is not None else 500,
            "records": info.records,
            "site": info.site,
            "duration_ms": round(seconds * 1000, 3),
        }
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        try:
            os.write(self._descriptor(), line)
        except OSError as error:
            if not self._failed:  # once: a full disk must not also flood the error log
                logger.error("access log %s cannot be written: %s", self.directory, error)
            self._failed = True

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
