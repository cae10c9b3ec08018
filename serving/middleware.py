"""ASGI middleware enforcing the HTTP contract: keys, scopes, sites, limits, body limits, error shape,
request ids, version header and the access log.

A plain ASGI middleware (no request/response objects) so the hot path pays for a few header
comparisons only. It

- answers 401 without a valid ``Authorization: Bearer <key>`` on every route except health, metrics
  and docs (:class:`serving.keys.KeyRing`);
- answers 403 when the key lacks the route's scope, or claims (in ``X-Site-Id`` or a record's
  ``site_id``, which the error names) a site it may not speak for: another one than it is bound to,
  or the smoke-test site, the rollout key's own; a bound key's site is filled in as ``X-Site-Id``;
- answers 429 with ``Retry-After`` over the key's rate or concurrency limit (:mod:`serving.access`);
- answers 415 for any body that is not JSON (BentoML's pickle content type included), and 413 for
  bodies over ``settings.max_body_bytes``, from Content-Length before reading, else by counting;
- answers 422 for an invalid ``X-Site-Id``, turns BentoML's 400 for a validation failure into 422
  naming each field (``records[3].mean_radius``) and reason, and gives every 4xx one shape
  (``{"error": ..., "detail": [...]}``, see :class:`serving.contract.ErrorDetail`);
- counts every refused (422) ``/predict`` request per site and field for monitoring's
  data-quality signal (:func:`refusal_lines`, written by :func:`pipelines.prediction_log.log_refusal`);
- adds ``X-Model-Version`` to every response (the handler sets it itself when it answered, so
  a model swap between scoring and sending cannot mislabel a response) and ``X-Request-Id`` (the
  client's if it is a safe token, else a new one; the prediction log records the same id);
- writes one access log line per request, refused ones included (:class:`serving.access.AccessLog`);
- serves ``GET /metadata`` and ``GET /model-card`` through their typed APIs (keeping ``Accept``,
  which chooses the card's Markdown or HTML).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import suppress
from typing import Any

from pipelines.prediction_log import SMOKE_TEST_SITE
from pipelines.schema import FEATURE_RANGES, FEATURES, SITE_PATTERN
from serving.access import REQUEST_ID_HEADER, REQUEST_STATE, AccessLog, RequestInfo, limiter_from_settings, request_id
from serving.contract import DEFAULT_SITE, DOCS_PATHS
from serving.keys import ROUTE_SCOPES, ApiKey, KeyRing

logger = logging.getLogger("medops.serving")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"}) | DOCS_PATHS  # docs are not patient data
API_PATHS = frozenset({"/predict", "/explain", "/feedback", "/metadata", "/model-card"})
GET_PATHS = frozenset({"/metadata", "/model-card"})
JSON_TYPES = frozenset({b"application/json", b""})
_VERSION_HEADER = b"x-model-version"
_SITE_HEADER = b"x-site-id"
_SITE = re.compile(SITE_PATTERN.encode())

_REASONS = {
    "missing": "missing",
    "extra_forbidden": "unknown field",
    "float_type": "wrong type: expected a number",
    "string_type": "wrong type: expected a string",
    "list_type": "wrong type: expected a list",
    "model_type": "wrong type: expected an object",
    "model_attributes_type": "wrong type: expected an object",
    "dict_type": "wrong type: expected an object",
    "finite_number": "not a finite number (NaN or infinity)",
    "json_invalid": "body is not valid JSON",
    "literal_error": "not one of the allowed values",
    "string_pattern_mismatch": "does not match the allowed pattern",
}


def field_path(loc: list[Any] | tuple[Any, ...]) -> str:
    """``["records", 3, "mean_radius"]`` -> ``"records[3].mean_radius"`` (``"body"`` for the root)."""
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    return path.removeprefix(".") or "body"


def describe_validation_error(error: dict[str, Any]) -> dict[str, str]:
    loc = error.get("loc") or []
    kind = str(error.get("type", "invalid"))
    message = str(error.get("msg", "invalid value"))
    reason = _REASONS.get(kind)
    name = loc[-1] if loc else None
    if kind in {"greater_than_equal", "less_than_equal", "greater_than", "less_than"} and name in FEATURE_RANGES:
        low, high = FEATURE_RANGES[name]
        reason = f"out of plausible range [{low}, {high}]"
    if kind == "missing" and name in FEATURES:
        reason = "missing feature"
    text = f"{reason}: {message}" if reason and reason != message else message
    return {"field": field_path(loc), "reason": text, "type": kind}


def _reshape_error(status: int, body: bytes) -> tuple[int, bytes]:
    """Give a 4xx (or 503) body of BentoML the contract's shape; validation failures become 422."""
    try:
        payload: Any = json.loads(body) if body else {}
    except ValueError:
        payload = {"error": body.decode("utf-8", "replace")}
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        payload = payload[0]  # BentoML wraps non-validation errors in a one-element list
    if not isinstance(payload, dict):
        payload = {"error": str(payload)}
    errors = payload.get("detail") if isinstance(payload.get("detail"), list) else []
    detail = [describe_validation_error(error) for error in errors if isinstance(error, dict)]
    status = 422 if status == 400 else status
    if status == 503:  # BentoML hides every 5xx message; the service's only 503 is an unlogged answer
        message = "prediction log unavailable: nothing was served or recorded; retry later"
        return status, json.dumps({"error": message, "detail": []}).encode()
    message = str(payload.get("error") or "invalid request")
    if detail:
        message = "invalid request: " + "; ".join(f"{item['field']}: {item['reason']}" for item in detail[:5])
    return status, json.dumps({"error": message, "detail": detail}).encode()


def _json_response(
    status: int, error: str, extra: list[tuple[bytes, bytes]] = (), detail: list[dict[str, str]] | None = None
) -> list[Message]:
    """A refusal in the contract's error shape (the version and request id headers are added on sending)."""
    body = json.dumps({"error": error, "detail": detail or []}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    return [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


def _field_refusal(status: int, field: str, reason: str, kind: str) -> list[Message]:
    return _json_response(
        status, f"invalid request: {field}: {reason}", detail=[{"field": field, "reason": reason, "type": kind}]
    )


class HttpContractMiddleware:
    """The HTTP contract in front of every route; ``model_version`` returns the version served (for the header)."""

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *, model_version: Callable[[], str]
    ) -> None:
        self.app = app
        self.model_version = model_version
        self._settings: Any = None
        self.keys: KeyRing | None = None
        self.max_body_bytes = 0
        self.limiter: Any = None
        self.access_log: AccessLog | None = None

    def _configure(self) -> None:
        """Keys, limits and the access log from the (cached) settings; rebuilt only when the settings object changes."""
        from medops.core.settings import get_settings

        settings = get_settings()
        if settings is not self._settings:
            self.keys = KeyRing(settings)
            self.max_body_bytes = settings.max_body_bytes
            self.limiter = limiter_from_settings(settings)
            if self.access_log is not None:
                self.access_log.close()
            self.access_log = AccessLog(settings.run_dir)
            self._settings = settings

    def _key(self, headers: list[tuple[bytes, bytes]]) -> ApiKey | None:
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer" or not token.strip():
                    return None
                assert self.keys is not None
                return self.keys.authenticate(token.strip())
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        self._configure()
        info = RequestInfo(request_id(scope["headers"]))
        # a state dict of this request's own: the service reads the request id and reports the record count
        scope["state"] = {**(scope.get("state") or {}), REQUEST_STATE: info}
        sending = _stamping(send, self.model_version().encode(), info)
        try:
            await self._handle(scope, receive, sending, info)
        finally:
            assert self.access_log is not None
            self.access_log.write(scope["method"], scope["path"], info, time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, info: RequestInfo) -> None:
        path = scope["path"]
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        key = self._key(headers)
        if key is None:
            challenge = [(b"www-authenticate", b"Bearer")]
            await _send_all(send, _json_response(401, "missing or invalid bearer key", challenge))
            return
        info.key_id = key.id
        needed = ROUTE_SCOPES.get(path)
        if not key.allows(needed):
            scopes = ", ".join(sorted(key.scopes)) or "none"
            message = f"this key may not call {path}: it needs the scope {needed!r} (the key has: {scopes})"
            await _send_all(send, _json_response(403, message))
            return
        refusal = self.limiter.admit(key.id, path)
        if refusal is not None:
            why, wait = refusal
            message = f"too many requests: {why}; retry after {wait} s"
            await _send_all(send, _json_response(429, message, [(b"retry-after", str(wait).encode())]))
            return
        try:
            await self._admitted(scope, receive, send, info, key)
        finally:
            self.limiter.release(key.id, path)

    async def _admitted(self, scope: Scope, receive: Receive, send: Send, info: RequestInfo, key: ApiKey) -> None:
        path = scope["path"]
        headers = scope["headers"]
        if path not in API_PATHS:
            await self.app(scope, receive, send)
            return

        if path in GET_PATHS and scope["method"] in ("GET", "HEAD"):
            accept = [(name, value) for name, value in headers if name == b"accept"]
            scope = dict(scope, method="POST", headers=[(b"content-type", b"application/json"), *accept])
            body = b"{}"
        else:
            content_type = b""
            content_length = None
            site_header = None
            for name, value in headers:
                if name == b"content-type":
                    content_type = value.split(b";", 1)[0].strip().lower()
                elif name == b"content-length":
                    content_length = value
                elif name == _SITE_HEADER:
                    if _SITE.match(value) is None:
                        if path == "/predict":
                            self._count_refusal([(key.site_id or DEFAULT_SITE, "X-Site-Id", "bad_pattern", 1, 1)])
                        reason = f"does not match {SITE_PATTERN}"
                        await _send_all(send, _field_refusal(422, "X-Site-Id", reason, "string_pattern_mismatch"))
                        return
                    site_header = value.decode()
            if (refused := _site_refusal("X-Site-Id", site_header, key)) is not None:
                await _send_all(send, refused)
                return
            info.site = site_header or key.site_id or DEFAULT_SITE
            if site_header is None and key.site_id is not None:  # the key speaks for its site
                scope = dict(scope, headers=[*headers, (_SITE_HEADER, key.site_id.encode())])
            if content_type not in JSON_TYPES:
                await _send_all(send, _json_response(415, "only application/json bodies are accepted"))
                return
            if content_length is not None:
                try:
                    declared = int(content_length)
                except ValueError:
                    declared = -1
                if declared < 0:
                    await _send_all(send, _json_response(400, "invalid Content-Length"))
                    return
                if declared > self.max_body_bytes:
                    # a client that sent "Expect: 100-continue" waits for us and never sends the body
                    if not any(name == b"expect" and value.lower() == b"100-continue" for name, value in headers):
                        await _drain(receive)
                    await _send_all(send, _too_large(self.max_body_bytes))
                    return
            body, complete = await _read_body(receive, self.max_body_bytes)
            if body is None:
                if not complete:
                    await _drain(receive)
                await _send_all(send, _too_large(self.max_body_bytes))
                return
            if (refused := _record_site_refusal(body, key)) is not None:
                await _send_all(send, refused)
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        def counting(detail: list[dict[str, str]]) -> None:
            self._count_refusal(refusal_lines(detail, body, info.site))

        await self.app(scope, replay, _shaping_errors(send, counting if path == "/predict" else None))

    def _count_refusal(self, lines: list[tuple[str, str, str, int, int]]) -> None:
        from pipelines.prediction_log import log_refusal

        try:
            log_refusal(self._settings, lines)
        except OSError as error:  # the client gets its 422 whether or not monitoring could count it
            logger.warning("could not count a refused request for monitoring: %s", error)


# What a refusal says about a field, in a few words monitoring can count by.
_REASON_KINDS = {
    "greater_than_equal": "out_of_range",
    "less_than_equal": "out_of_range",
    "greater_than": "out_of_range",
    "less_than": "out_of_range",
    "missing": "missing",
    "finite_number": "not_a_number",
    "float_type": "wrong_type",
    "float_parsing": "wrong_type",
    "string_type": "wrong_type",
    "extra_forbidden": "unknown_field",
    "string_pattern_mismatch": "bad_pattern",
}
_RECORD = re.compile(r"^records\[(\d+)\]\.([A-Za-z0-9_]{1,64})$")


def refusal_lines(
    detail: list[dict[str, str]], body: bytes, default_site: str | None
) -> list[tuple[str, str, str, int, int]]:
    """``(site, field, reason kind, records naming it, records refused from that site)`` of one refused request.

    A record's site is its own ``site_id``, else ``default_site`` (as the service logs it); a body that is
    not a list of records counts as one record of that site. Field names and counts only, never a value sent.
    """
    default = default_site if default_site and _SITE.match(default_site.encode()) else DEFAULT_SITE
    try:
        records = json.loads(body).get("records")
    except (ValueError, AttributeError, UnicodeDecodeError):
        records = None
    records = records if isinstance(records, list) else []

    def site_of(index: int | None) -> str:
        record = records[index] if index is not None and index < len(records) else None
        site = record.get("site_id") if isinstance(record, dict) else None
        return site if isinstance(site, str) and _SITE.match(site.encode()) else default

    per_site = Counter(site_of(index) for index in range(len(records)) or [None])
    named: Counter[tuple[str, str, str]] = Counter()
    for item in detail:
        matched = _RECORD.match(item.get("field", ""))
        index, name = (int(matched.group(1)), matched.group(2)) if matched else (None, "body")
        named[(site_of(index), name, _REASON_KINDS.get(item.get("type", ""), "invalid"))] += 1
    lines, first = [], set()
    for (site, name, kind), count in sorted(named.items()):
        lines.append((site, name, kind, count, 0 if site in first else per_site.get(site, 0)))
        first.add(site)
    # Sites whose records were refused with the request though none of theirs was at fault.
    lines += [(site, "none", "refused_with_request", 0, n) for site, n in sorted(per_site.items()) if site not in first]
    return lines


def _site_refusal(field: str, site: str | None, key: ApiKey) -> list[Message] | None:
    """A 403 naming ``field`` if ``key`` may not speak for ``site`` (None: the field was not sent)."""
    if site is None:
        return None
    if key.site_id is not None and site != key.site_id:
        return _field_refusal(403, field, f"this key is bound to site {key.site_id}", "site_not_allowed")
    if key.site_id is None and site == SMOKE_TEST_SITE:
        reason = f"the site {SMOKE_TEST_SITE} is reserved for the rollout's smoke tests"
        return _field_refusal(403, field, reason, "site_not_allowed")
    return None


def _record_site_refusal(body: bytes, key: ApiKey) -> list[Message] | None:
    """A 403 for the first record whose ``site_id`` the key may not claim. Parsed only when the body can
    name a site (``site_id``, or a JSON escape that could spell it); one that does not parse gets the service's 422."""
    if b"site_id" not in body and b"\\u" not in body:
        return None
    import orjson

    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    records = document.get("records") if isinstance(document, dict) else None
    for index, record in enumerate(records if isinstance(records, list) else []):
        site = record.get("site_id") if isinstance(record, dict) else None
        if isinstance(site, str) and (refused := _site_refusal(f"records[{index}].site_id", site, key)):
            return refused
    return None


def _too_large(limit: int) -> list[Message]:
    return _json_response(413, f"request body larger than {limit} bytes", [(b"connection", b"close")])


# A refused body is read and thrown away before the 413 goes out: closing a socket that still
# holds unread request bytes makes the kernel send a reset, and a client that sends its whole body
# before reading (urllib, requests, httpx) then sees ConnectionResetError instead of the 413.
# Reading stops after this many bytes or seconds, so a refused client costs a bounded amount.
DRAIN_LIMIT_BYTES = 128 * 1024 * 1024
DRAIN_SECONDS = 30.0


async def _drain(receive: Receive) -> None:
    """Read and discard the rest of a refused body, up to DRAIN_LIMIT_BYTES and DRAIN_SECONDS."""
    import asyncio

    async def discard() -> None:
        drained = 0
        while drained <= DRAIN_LIMIT_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return
            drained += len(message.get("body", b""))

    with suppress(TimeoutError):
        await asyncio.wait_for(discard(), DRAIN_SECONDS)


async def _read_body(receive: Receive, limit: int) -> tuple[bytes | None, bool]:
    """(the whole request body, True), or (None, whether the client has sent all of it) once the
    body grows past ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None, not message.get("more_body", False)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), True


async def _send_all(send: Send, messages: list[Message]) -> None:
    for message in messages:
        await send(message)


def _stamping(send: Send, version: bytes, info: RequestInfo) -> Send:
    """Add X-Model-Version (unless the handler set it) and X-Request-Id; note the status for the access log."""
    request = info.request_id.encode()

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(n, v) for n, v in message.get("headers", []) if n.lower() != REQUEST_ID_HEADER]
            if not any(name.lower() == _VERSION_HEADER for name, _ in headers):
                headers.append((_VERSION_HEADER, version))
            message["headers"] = [*headers, (REQUEST_ID_HEADER, request)]
            info.status = message["status"]
        await send(message)

    return sending


def _shaping_errors(send: Send, refused: Callable[[list[dict[str, str]]], None] | None = None) -> Send:
    """Pass successful responses through; buffer and reshape 4xx (and 503) ones. ``refused`` is called
    with the detail of each 422 sent (monitoring counts refusals by it)."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def sending(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and (400 <= message["status"] < 500 or message["status"] == 503):
            start = dict(message)
            return
        if start is None or message["type"] != "http.response.body":
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        status, body = _reshape_error(start["status"], b"".join(chunks))
        if status == 422 and refused is not None:
            refused(json.loads(body)["detail"])
        headers = [(n, v) for n, v in start.get("headers", []) if n.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return sending
