"""API keys of the service: scoped, optionally bound to a site, stored as hashes, revocable live.

``MEDOPS_HOME/secrets/keys.json`` (0600, replaced atomically under a lock) lists every key made with
``medops keys create`` with the SHA-256 of the key; the key itself is printed once and never stored.

Scopes: ``predict`` (/predict), ``explain`` (/explain), ``feedback`` (/feedback); ``admin`` opens
every route. /metadata, /model-card and the OpenAPI document need a valid key of any scope.

A key bound to a site speaks only for that site (:mod:`serving.middleware` enforces it). The
smoke-test site, whose traffic monitoring leaves out, belongs to the rollout's own key, :func:`rollout_key`.

``MEDOPS_API_KEYS`` (or the key generated on first run) are unscoped keys: every scope, no site. A
running service picks up created and revoked keys within a second, without a restart (:class:`KeyRing`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from medops.core.files import file_lock, write_atomically
from pipelines.prediction_log import SMOKE_TEST_SITE
from pipelines.schema import SITE_PATTERN

if TYPE_CHECKING:
    from medops.core.settings import Settings

PREDICT, EXPLAIN, FEEDBACK, ADMIN = "predict", "explain", "feedback", "admin"
SCOPES: tuple[str, ...] = (PREDICT, EXPLAIN, FEEDBACK, ADMIN)
ROUTE_SCOPES = {"/predict": PREDICT, "/explain": EXPLAIN, "/feedback": FEEDBACK}
ROLLOUT_KEY_ID = "rollout"
ROLLOUT_SCOPES = (PREDICT, EXPLAIN)  # its smoke test: /predict, /explain and /metadata
RELOAD_SECONDS = 1.0

logger = logging.getLogger("medops.serving")


class KeyCommandError(ValueError):
    """A key command that cannot be done (unknown id, bad scope or site); the message says why."""


@dataclass(frozen=True)
class ApiKey:
    """One key as the service knows it (never the key itself)."""

    id: str
    scopes: frozenset[str]
    site_id: str | None = None
    name: str = ""
    created_at: str = ""
    revoked_at: str | None = None
    sha256: str = field(default="", repr=False)

    def allows(self, scope: str | None) -> bool:
        return scope is None or ADMIN in self.scopes or scope in self.scopes

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_public(self) -> dict[str, Any]:
        """What ``medops keys list`` shows: everything but the hash."""
        public = asdict(self) | {"scopes": sorted(self.scopes)}
        return {name: public[name] for name in ("id", "name", "scopes", "site_id", "created_at", "revoked_at")}


def hash_key(key: str | bytes) -> str:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _from_json(item: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=str(item["id"]),
        scopes=frozenset(item.get("scopes") or ()),
        site_id=item.get("site_id"),
        name=str(item.get("name") or ""),
        created_at=str(item.get("created_at") or ""),
        revoked_at=item.get("revoked_at"),
        sha256=str(item["sha256"]),
    )


def read_keys(settings: Settings) -> list[ApiKey]:
    """Every key in ``keys.json`` (revoked ones included), oldest first; [] when there is none."""
    try:
        document = json.loads(settings.api_keys_file.read_text())
    except FileNotFoundError:
        return []
    return [_from_json(item) for item in document.get("keys", [])]


def _write_keys(settings: Settings, keys: list[ApiKey]) -> None:
    settings.secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.secrets_dir.chmod(0o700)
    document = {"keys": [asdict(key) | {"scopes": sorted(key.scopes)} for key in keys]}
    write_atomically(settings.api_keys_file, json.dumps(document, indent=1) + "\n", mode=0o600)


def _lock(settings: Settings):
    return file_lock(settings.secrets_dir / ".keys.lock", timeout=30)


def create_key(
    settings: Settings, scopes: list[str] | tuple[str, ...], *, site_id: str | None = None, name: str = ""
) -> tuple[ApiKey, str]:
    """A new key with ``scopes`` (bound to ``site_id`` if given): (its record, the key, shown once)."""
    wanted = sorted(set(scopes))
    if not wanted:
        raise KeyCommandError(f"a key needs at least one scope: {', '.join(SCOPES)}")
    unknown = [scope for scope in wanted if scope not in SCOPES]
    if unknown:
        raise KeyCommandError(f"unknown scope {', '.join(unknown)}; choose from {', '.join(SCOPES)}")
    if site_id is not None and not re.fullmatch(SITE_PATTERN, site_id):
        raise KeyCommandError(f"site {site_id!r} does not match {SITE_PATTERN}")
    if site_id == SMOKE_TEST_SITE:
        raise KeyCommandError(f"the site {SMOKE_TEST_SITE} is reserved for the rollout's own key")
    with _lock(settings):
        keys = read_keys(settings)
        taken = {key.id for key in keys}
        key_id = ""
        while not key_id or key_id in taken:
            key_id = "k" + secrets.token_hex(4)
        record, secret = _new_key(key_id, wanted, site_id, name)
        _write_keys(settings, [*keys, record])
    return record, secret


def _new_key(key_id: str, scopes: Iterable[str], site_id: str | None, name: str) -> tuple[ApiKey, str]:
    """A fresh secret and its record (only the secret's hash is kept)."""
    secret = "mdk_" + secrets.token_urlsafe(32)
    record = ApiKey(key_id, frozenset(scopes), site_id, name, created_at=_now(), sha256=hash_key(secret))
    return record, secret


def revoke_key(settings: Settings, key_id: str) -> ApiKey:
    """Mark a key revoked (kept in the file for the record); running services refuse it within a second."""
    with _lock(settings):
        keys = read_keys(settings)
        found = [key for key in keys if key.id == key_id]
        if not found:
            raise KeyCommandError(f"no key with id {key_id!r} (medops keys list shows them)")
        if not found[0].active:
            return found[0]
        revoked = ApiKey(**{**asdict(found[0]), "revoked_at": _now()})
        _write_keys(settings, [revoked if key.id == key_id else key for key in keys])
    return revoked


def rollout_key(settings: Settings) -> str:
    """The key the rollout's smoke tests send, bound to the smoke-test site; made on first use. Its secret
    is kept in ``secrets/rollout_key`` (0600) because the rollout must send it; revoking it (``medops keys
    revoke rollout``) makes the next rollout create a new one."""
    path = settings.secrets_dir / "rollout_key"
    with _lock(settings):
        keys = read_keys(settings)
        current = next((key for key in keys if key.id == ROLLOUT_KEY_ID and key.active), None)
        secret = path.read_text().strip() if path.exists() else ""
        if current is not None and secret and hmac.compare_digest(hash_key(secret), current.sha256):
            return secret
        record, secret = _new_key(ROLLOUT_KEY_ID, ROLLOUT_SCOPES, SMOKE_TEST_SITE, "rollout smoke tests")
        settings.secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(path, secret + "\n", mode=0o600)
        _write_keys(settings, [*(key for key in keys if key.id != ROLLOUT_KEY_ID), record])
    return secret


def configured_keys(settings: Settings) -> list[ApiKey]:
    """``MEDOPS_API_KEYS`` (or the generated first-run key) as unscoped keys: every scope, no site."""
    generated = not settings.api_keys
    name = "generated on first run" if generated else "MEDOPS_API_KEYS"
    return [
        ApiKey("generated" if generated else f"env-{digest[:8]}", frozenset(SCOPES), name=name, sha256=digest)
        for digest in map(hash_key, settings.service_api_keys())
    ]


def has_deliberate_keys(settings: Settings) -> bool:
    """Whether someone configured authentication: ``MEDOPS_API_KEYS`` or an active ``medops keys`` key."""
    return bool(settings.api_keys) or any(key.active and key.id != ROLLOUT_KEY_ID for key in read_keys(settings))


class KeyRing:
    """The keys a serving worker accepts, re-read when ``keys.json`` changes (checked at most once a second)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._configured = configured_keys(settings)
        self._stored: list[ApiKey] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._digests: list[tuple[bytes, ApiKey]] = []
        self._reload(force=True)

    def _reload(self, *, force: bool = False) -> None:
        try:
            status = self.settings.api_keys_file.stat()
            stamp: tuple[int, int, int] | None = (status.st_mtime_ns, status.st_ino, status.st_size)
        except FileNotFoundError:
            stamp = None
        if force or stamp != self._stamp:
            try:
                stored = read_keys(self.settings)
            except (OSError, ValueError, KeyError) as error:  # keep the keys we had rather than none
                logger.error("cannot read %s: %s", self.settings.api_keys_file, error)
                stored = self._stored
            self._stored, self._stamp = stored, stamp
            self._digests = [(bytes.fromhex(key.sha256), key) for key in [*self._configured, *stored] if key.active]

    def authenticate(self, token: bytes) -> ApiKey | None:
        """The key whose hash is the token's, or None; every stored hash is compared, in constant time."""
        now = time.monotonic()
        if now - self._checked >= RELOAD_SECONDS:
            self._checked = now
            self._reload()
        digest = hashlib.sha256(token).digest()
        found = None
        for stored, key in self._digests:
            if hmac.compare_digest(digest, stored):
                found = key
        return found
