"""The audit trail: an append-only, hash-chained log of every decision the platform takes.

Each entry (one JSON line in ``MEDOPS_HOME/audit/audit.jsonl``) carries the hash of the entry
before it and its own (SHA-256 of its canonical JSON), so :func:`verify` names the first entry
changed, removed, reordered or inserted. A head record (``audit/head.json``) catches truncation;
a chain rewritten consistently to its end is caught only against hashes kept elsewhere (an MLflow
tag, the model card), passed as ``anchors``. Appends are locked across processes, written in one
O_APPEND write and fsynced; the files are readable by their owner only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medops.core.settings import Settings, get_settings

AUDIT_FILE = "audit.jsonl"
HEAD_FILE = "head.json"
LOCK_FILE = "audit.lock"
GENESIS = "0" * 64
ACTIONS = ("data_version", "training_run", "gate_decision", "approval", "refusal", "promotion", "deployment",
           "rollback", "override", "protocol_change")  # fmt: skip
# Stand-ins that name nobody: an approval must carry a real user name.
PLACEHOLDER_ACTORS = frozenset({"", "approver", "unknown", "none", "null", "user"})
LOCK_TIMEOUT_SECONDS = 60.0


class AuditError(RuntimeError):
    """The audit log cannot be read or extended safely; the message says which entry and why."""


class AuditEntry(BaseModel):
    """One line of the audit log."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seq: int = Field(ge=1)
    time: str
    actor: str
    action: str
    reason: str
    links: dict[str, str] = {}
    details: dict[str, Any] = {}
    prev_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("actor")
    @classmethod
    def _named_actor(cls, value: str) -> str:
        if value.strip().lower() in PLACEHOLDER_ACTORS:
            raise ValueError(f"actor {value!r} names nobody: record the person's or the component's name")
        return value

    @field_validator("action")
    @classmethod
    def _known_action(cls, value: str) -> str:
        if value not in ACTIONS:
            raise ValueError(f"unknown action {value!r}; one of {', '.join(ACTIONS)}")
        return value

    def computed_hash(self) -> str:
        return entry_hash(self.model_dump(exclude={"hash"}))


class Verification(BaseModel):
    """What :func:`verify` found: ``ok``, how many entries, and the first entry that cannot be trusted."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    entries: int
    first_bad_seq: int | None = None
    problem: str | None = None
    head_seq: int | None = None
    head_hash: str | None = None


def entry_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of an entry's fields (everything but ``hash``)."""
    return hashlib.sha256(_canonical(fields)).hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def audit_dir(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).home / "audit"


def audit_path(settings: Settings | None = None) -> Path:
    return audit_dir(settings) / AUDIT_FILE


def append(
    action: str,
    *,
    actor: str,
    reason: str,
    links: Mapping[str, Any] | None = None,
    details: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
) -> AuditEntry:
    """Add one entry at the end of the chain and return it (its ``hash`` is the anchor to keep elsewhere).

    Refuses (AuditError) to extend a log whose last entry is damaged, which a new entry would vouch
    for, and (ValueError) an unknown action, a placeholder actor or details that are not plain JSON.
    """
    from filelock import FileLock

    directory = _ensure_dir(audit_dir(settings))
    fields = {
        "seq": 0,
        "time": datetime.now(UTC).isoformat(timespec="microseconds"),
        "actor": actor,
        "action": action,
        "reason": reason,
        "links": {str(key): str(value) for key, value in (links or {}).items() if value is not None},
        "details": dict(details or {}),
        "prev_hash": GENESIS,
    }
    try:
        _canonical(fields["details"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"details: must be plain JSON (no NaN, no objects): {error}") from None
    AuditEntry.model_validate(fields | {"seq": 1, "hash": GENESIS})  # field errors before taking the lock

    with FileLock(directory / LOCK_FILE, timeout=LOCK_TIMEOUT_SECONDS, mode=0o600):
        path = directory / AUDIT_FILE
        if (last := _last_entry(path)) is not None:
            fields["seq"], fields["prev_hash"] = last.seq + 1, last.hash
        else:
            fields["seq"] = 1
        entry = AuditEntry.model_validate(fields | {"hash": entry_hash(fields)})
        _append_line(path, _canonical(entry.model_dump()) + b"\n")
        _write_head(directory, entry)
    return entry


def entries(settings: Settings | None = None) -> list[AuditEntry]:
    """Every entry in order; AuditError names the first line that is not a valid entry."""
    path = audit_path(settings)
    if not path.exists():
        return []
    result = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            result.append(_parse(line))
        except ValueError as error:
            raise AuditError(f"{path} line {number}: not a valid audit entry ({error})") from None
    return result


def verify(settings: Settings | None = None, *, anchors: Mapping[int, str] | None = None) -> Verification:
    """Recompute the chain and name the first entry that cannot be trusted, and why.

    ``anchors`` maps seq -> hash as recorded elsewhere when the entry was written; an entry whose
    hash differs from its anchor was rewritten even if the chain after it was rebuilt.
    """
    directory = audit_dir(settings)
    path = directory / AUDIT_FILE
    lines = path.read_bytes().splitlines() if path.exists() else []
    parsed: list[AuditEntry | None] = []
    for line in lines:
        try:
            parsed.append(_parse(line))
        except ValueError:
            parsed.append(None)
    head = _read_head(directory)
    recorded = {"head_seq": head.get("seq"), "head_hash": head.get("hash")} if head else {}

    def bad(seq: int, problem: str) -> Verification:
        return Verification(ok=False, entries=len(lines), first_bad_seq=seq, problem=problem, **recorded)

    seqs_present = {entry.seq: position for position, entry in enumerate(parsed, start=1) if entry is not None}
    previous_hash = GENESIS
    for position, entry in enumerate(parsed, start=1):
        if entry is None:
            return bad(position, f"line {position} is not a valid audit entry: edited or truncated")
        if entry.computed_hash() != entry.hash:
            return bad(position, f"entry seq {entry.seq} was edited: its content no longer matches its hash")
        if entry.seq != position:
            return bad(*_out_of_place(position, entry, parsed, seqs_present))
        if entry.prev_hash != previous_hash:
            if position == 1:
                return bad(1, "entry seq 1 does not start the chain: its link to the start was changed")
            return bad(
                position - 1,
                f"entry seq {position - 1} was rewritten: its hash is not the one entry seq {position} "
                f"recorded for it (or seq {position}'s link was changed)",
            )
        if anchors and position in anchors and anchors[position] != entry.hash:
            return bad(position, f"entry seq {position} differs from the hash recorded for it elsewhere")
        previous_hash = entry.hash

    count = len(parsed)
    for seq in sorted(anchors or {}):
        if seq > count:
            return bad(count + 1, f"entries from seq {count + 1} are missing: seq {seq} is recorded elsewhere")
    if head is None:
        if count:
            return bad(count, f"the head record {HEAD_FILE} is missing: the end of the log cannot be confirmed")
        return Verification(ok=True, entries=0)
    head_seq, head_hash = head.get("seq"), head.get("hash")
    if not isinstance(head_seq, int) or head_seq < 0:
        return bad(1, f"the head record {HEAD_FILE} is damaged")
    if head_seq > count:
        return bad(count + 1, f"entries seq {count + 1} to {head_seq} were removed: the log was truncated")
    if head_seq < count:
        return bad(
            head_seq + 1,
            f"entries after seq {head_seq} are not confirmed by the head record "
            "(added outside medops, or an append was interrupted)",
        )
    if count and parsed[-1] is not None and parsed[-1].hash != head_hash:
        return bad(count, f"entry seq {count} differs from the head record: the log was rewritten up to its end")
    return Verification(ok=True, entries=count, head_seq=head_seq, head_hash=head_hash)


def _out_of_place(
    position: int, entry: AuditEntry, parsed: list[AuditEntry | None], seqs_present: dict[int, int]
) -> tuple[int, str]:
    """The first untrustworthy seq when line ``position`` holds another seq, and why: removed, reordered, inserted."""
    if entry.seq < position:
        before = parsed[position - 3] if position >= 3 else None
        if entry.prev_hash == (before.hash if before is not None else GENESIS):
            return position - 1, (
                f"an entry was inserted at line {position - 1}: the entry after it (seq {entry.seq}) "
                "chains to the entry before it"
            )
        return position, f"line {position} repeats seq {entry.seq}: an entry was inserted or duplicated before it"
    later = seqs_present.get(position)
    if later is not None and later > position:
        return position, f"entries reordered: seq {position} stands at line {later}, seq {entry.seq} at line {position}"
    missing = ", ".join(str(seq) for seq in range(position, entry.seq))
    return position, f"entry seq {missing} removed: line {position} holds seq {entry.seq}"


def _parse(line: bytes) -> AuditEntry:
    try:
        return AuditEntry.model_validate_json(line)
    except ValidationError as error:
        first = error.errors()[0]
        raise ValueError(f"{'.'.join(str(p) for p in first['loc']) or 'entry'}: {first['msg']}") from None


def _last_entry(path: Path) -> AuditEntry | None:
    """The last entry, read from the end of the file; AuditError when it is damaged."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        block, tail = 4096, b""
        while True:
            start = max(0, size - block)
            handle.seek(start)
            tail = handle.read(size - start)
            body = tail[:-1] if tail.endswith(b"\n") else tail
            if b"\n" in body or start == 0:
                break
            block *= 2
    if not tail.endswith(b"\n"):
        raise AuditError(f"{path}: the last line is incomplete (interrupted write?); run `medops audit verify`")
    line = tail[:-1].rsplit(b"\n", 1)[-1]
    try:
        entry = _parse(line)
    except ValueError as error:
        raise AuditError(f"{path}: the last entry is damaged ({error}); run `medops audit verify`") from None
    if entry.computed_hash() != entry.hash:
        raise AuditError(f"{path}: the last entry (seq {entry.seq}) does not match its hash; run `medops audit verify`")
    return entry


def _ensure_dir(directory: Path) -> Path:
    created = not directory.exists()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    if created:
        _fsync_dir(directory.parent)
    return directory


def _append_line(path: Path, data: bytes) -> None:
    created = not path.exists()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        written = os.write(descriptor, data)
        if written != len(data):  # a short write on a full disk: the line is incomplete, say so loudly
            raise AuditError(f"{path}: only {written} of {len(data)} bytes written (disk full?)")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    if created:
        _fsync_dir(path.parent)


def _write_head(directory: Path, entry: AuditEntry) -> None:
    partial = directory / (HEAD_FILE + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, _canonical({"seq": entry.seq, "hash": entry.hash}) + b"\n")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(partial, directory / HEAD_FILE)
    _fsync_dir(directory)


def _read_head(directory: Path) -> dict[str, Any] | None:
    path = directory / HEAD_FILE
    if not path.exists():
        return None
    try:
        head = json.loads(path.read_bytes())
    except ValueError:
        return {"seq": -1}
    return head if isinstance(head, dict) else {"seq": -1}


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
