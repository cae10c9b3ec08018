"""Ingest: validate a landed batch, quarantine what fails, version what passes.

Nothing a hospital sends is dropped: every row ends in a data version or in quarantine with its
reason (``accepted + quarantined == received`` per file); an unusable file is kept whole in
quarantine. A file landing twice is recognised by its checksum. Each file is ingested under the
registry lock and a journal (:mod:`pipelines.data_registry`), so a crash at any step is finished or
rolled back.

Landed files can carry patient identifiers, in a column or in their name. A landed file refused
whole is moved (not copied) into quarantine under its SHA-256; its original name is kept only in
that quarantine's ``summary.json``, for the reviewer to tell the site which file was refused,
readable by medops' user only (0600 in a 0700 folder) beside the more sensitive content. Commit
messages, the manifest, task results and logs name a batch by its checksum's prefix and its site.
Accepted files are archived in ``landing/processed/`` and deleted after ``MEDOPS_LANDING_RETENTION_DAYS``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from medops.core.files import atomic_writer, sha256_file, write_atomically
from medops.core.settings import Settings
from pipelines import data_registry
from pipelines.governance import SCHEDULER
from pipelines.validate import REASON, BatchRejected, ValidationResult, read_batch, validate_batch

PROCESSED = "processed"
CLAIMED = ".claimed"
PARTIAL = (".part", ".tmp")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    """What became of one landed file."""

    file: str
    sha256: str
    status: str  # versioned | all_rows_quarantined | rejected_whole | already_ingested
    received: int
    accepted: int
    quarantined: int
    version: str | None = None
    quarantine_path: str | None = None
    reason: str | None = None

    def summary(self) -> str:
        label = f"batch {self.sha256[:12]}"  # by its checksum, never by its file name
        if self.status == "already_ingested":
            return f"{label}: already ingested ({self.reason}); no new version"
        if self.status == "rejected_whole":
            return f"{label}: quarantined whole: {self.reason} -> {self.quarantine_path}"
        line = f"{label}: received {self.received}, accepted {self.accepted}, quarantined {self.quarantined}"
        return line + (f" -> {self.version}" if self.version else " -> no new version")

    def to_dict(self) -> dict:
        """Everything but the file's name, for task results and ``--json`` (both end up in logs)."""
        return {key: value for key, value in asdict(self).items() if key != "file"}


def _waiting(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and not p.name.endswith(PARTIAL)]


def landing_files(settings: Settings) -> list[Path]:
    """Files waiting in the landing folder or a per-site ``landing/<site_id>/``; hidden and partial
    ones (``.part``, ``.tmp``) wait until renamed."""
    root = settings.landing_dir
    if not root.exists():
        return []
    files = _waiting(root)
    for folder in root.iterdir():
        if folder.is_dir() and not folder.name.startswith(".") and folder.name != PROCESSED:
            files.extend(_waiting(folder))
    return sorted(files)


def _quarantine_folder(sha256: str, settings: Settings) -> Path:
    """Where a batch's quarantine goes: named by time and checksum, never by the file's name."""
    return settings.quarantine_dir / f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{sha256[:12]}"


def _private_folder(folder: Path) -> None:
    """Create ``folder`` and its parent readable by medops' user only (mkdir's mode is cut by the umask)."""
    for level in (folder.parent, folder):
        level.mkdir(parents=True, exist_ok=True)
        level.chmod(0o700)


def quarantine_batch(
    rejected: pd.DataFrame,
    *,
    name: str,
    sha256: str,
    received: int,
    settings: Settings,
    journal: data_registry.IngestJournal,
) -> Path:
    """Write rejected rows (as received, with row number and reason) and a summary of reasons."""
    folder = _quarantine_folder(sha256, settings)
    journal.note(quarantine=str(folder))
    _private_folder(folder)
    write_atomically(folder / "rows.csv", rejected.to_csv(index=False), mode=0o600)
    reasons = rejected[REASON].str.split("; ").explode().str.split(":").str[0].value_counts()
    by_reason = {str(k): int(v) for k, v in reasons.items()}
    summary = dict(file=name, sha256=sha256, received=received, quarantined=len(rejected), rows_by_reason=by_reason)
    write_atomically(folder / "summary.json", json.dumps(summary, indent=1) + "\n", mode=0o600)
    data_registry.crash_point("after_quarantine")
    return folder


def _stored_name(path: Path, sha256: str) -> str:
    suffix = path.suffix.lower()
    return sha256 + (suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else "")


def quarantine_file(
    path: Path,
    *,
    sha256: str,
    reason: str,
    settings: Settings,
    move: bool = False,
    journal: data_registry.IngestJournal | None = None,
) -> Path:
    """Keep an unusable file whole, byte for byte and named by its SHA-256, next to why it was refused.

    ``move`` takes a landed file away so nothing of it stays readable in the landing folder; without
    it the file is copied (a path given at the terminal stays the operator's).
    """
    folder = _quarantine_folder(sha256, settings)
    stored = folder / _stored_name(path, sha256)
    moved = {"moved_from": str(path), "moved_to": str(stored)} if move else {}
    if journal is not None:
        journal.note(quarantine=str(folder), **moved)
    _private_folder(folder)
    summary = {"file": path.name, "sha256": sha256, "reason": reason, "whole_file": True, "stored_as": stored.name}
    write_atomically(folder / "summary.json", json.dumps(summary, indent=1) + "\n", mode=0o600)
    if move:
        shutil.move(str(path), stored)
        stored.chmod(0o600)
    else:
        with path.open("rb") as source, atomic_writer(stored, mode=0o600) as copy:
            shutil.copyfileobj(source, copy)
    data_registry.crash_point("after_quarantine")
    return folder


def _ingest(path: Path, settings: Settings, site_id: str | None, *, archive: bool, actor: str) -> IngestResult:
    """Ingest one file holding the registry lock throughout, checks included; archive it if asked."""
    data_registry.init_registry(settings, actor=actor)
    with data_registry.locked_registry(settings):
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        result = _ingest_locked(path, settings, site_id, actor=actor)
        if archive and path.exists():
            archive_landed(path, settings)
    return result


def _ingest_locked(path: Path, settings: Settings, site_id: str | None, *, actor: str) -> IngestResult:
    landed = settings.landing_dir.resolve() in path.resolve().parents
    sha256 = sha256_file(path)  # the key that makes ingest idempotent
    label = f"batch {sha256[:12]}" + (f" for {site_id}" if site_id else "")
    previous = data_registry.find_batch(sha256, settings)
    if previous is not None:
        where = previous.get("version") or "no version: every row was quarantined"
        quarantine_path = None
        if landed and not previous["accepted"] and not previous["quarantined"]:
            # A resent copy of a file refused whole (perhaps for identifiers) must not be archived.
            where = f"already quarantined whole on {previous['at']}"
            quarantine_path = str(quarantine_file(path, sha256=sha256, reason=where, settings=settings, move=True))
        return IngestResult(
            path.name, sha256, "already_ingested", 0, 0, 0, previous.get("version"), quarantine_path, where
        )
    try:
        raw = read_batch(path)
        result = validate_batch(raw, site_id=site_id, existing_keys=data_registry.existing_row_keys(settings))
    except BatchRejected as rejected:
        with data_registry.journaled(sha256, settings) as journal:
            folder = quarantine_file(
                path, sha256=sha256, reason=str(rejected), settings=settings, move=landed, journal=journal
            )
            data_registry.record_batch(
                pd.DataFrame(),
                source_name=label,
                sha256=sha256,
                quarantined=0,
                settings=settings,
                journal=journal,
                actor=actor,
            )
        return IngestResult(
            path.name, sha256, "rejected_whole", 0, 0, 0, quarantine_path=str(folder), reason=str(rejected)
        )
    version, folder = record_validated(
        result, name=path.name, label=label, sha256=sha256, settings=settings, actor=actor
    )
    return IngestResult(
        file=path.name,
        sha256=sha256,
        status="versioned" if version else "all_rows_quarantined",
        received=result.received,
        accepted=len(result.accepted),
        quarantined=len(result.rejected),
        version=version.tag if version else None,
        quarantine_path=str(folder) if folder else None,
    )


def record_validated(
    result: ValidationResult,
    *,
    name: str,
    label: str,
    sha256: str,
    settings: Settings,
    origin: str = "landing",
    actor: str = SCHEDULER,
) -> tuple[data_registry.DataVersion | None, Path | None]:
    """Quarantine a validated batch's rejected rows and version its accepted rows, under one journal.

    The caller holds the registry lock (the batch was validated against the registry's rows under it).
    Returns the new data version (None when no row was accepted) and the quarantine folder.
    """
    folder = None
    with data_registry.journaled(sha256, settings) as journal:
        if len(result.rejected):
            folder = quarantine_batch(
                result.rejected, name=name, sha256=sha256, received=result.received, settings=settings, journal=journal
            )
        version = data_registry.record_batch(
            result.accepted,
            source_name=label,
            sha256=sha256,
            quarantined=len(result.rejected),
            settings=settings,
            origin=origin,
            journal=journal,
            actor=actor,
        )
    return version, folder


def ingest_file(path: Path, settings: Settings, site_id: str | None = None, *, actor: str = SCHEDULER) -> IngestResult:
    """Validate one file: accepted rows into a new data version (audited by ``actor``), the rest quarantined.

    A landed file refused whole is moved into quarantine, a path elsewhere left where it is; archived
    landed files past their retention are purged after.
    """
    result = _ingest(path, settings, site_id, archive=False, actor=actor)
    purge_landing(settings)
    return result


def archive_landed(path: Path, settings: Settings) -> None:
    """Move an ingested file out of the landing folder into ``processed/`` until its retention ends."""
    target = settings.landing_dir / PROCESSED / path.relative_to(settings.landing_dir)
    _private_folder(target.parent)
    if target.exists():
        target = target.with_name(f"{target.stem}.{os.getpid()}.{datetime.now(UTC):%Y%m%d%H%M%S%f}{target.suffix}")
    shutil.move(str(path), target)
    os.utime(target)  # retention counts from the ingest, not from when the hospital wrote the file
    _release_claim(path, settings)


def _release_claim(path: Path, settings: Settings) -> None:
    relative = path.relative_to(settings.landing_dir)
    (settings.landing_dir / CLAIMED / str(relative).replace(os.sep, "__")).unlink(missing_ok=True)


def ingest_landing(settings: Settings, site_id: str | None = None, *, actor: str = SCHEDULER) -> list[IngestResult]:
    """Ingest every file waiting in the landing folder, oldest name first, archiving each after;
    one a concurrent ingest (``medops ingest``, another run) took meanwhile is skipped."""
    # Settled first: a rolled-back ingest puts its file back into the landing folder.
    data_registry.init_registry(settings, actor=actor)
    results = []
    for path in landing_files(settings):
        site = site_id or (path.parent.name if path.parent != settings.landing_dir else None)  # its subfolder's
        try:
            results.append(_ingest(path, settings, site, archive=True, actor=actor))
        except FileNotFoundError:
            log.info("a landed file was taken by a concurrent ingest; skipped")
        if not path.exists():
            _release_claim(path, settings)
    purge_landing(settings)
    return results


@dataclass(frozen=True)
class PurgeResult:
    """How many archived landed files the retention deleted, and how many it kept."""

    purged: int
    kept: int
    retention_days: float


def purge_landing(settings: Settings) -> PurgeResult:
    """Delete files archived in ``landing/processed/`` longer ago than ``MEDOPS_LANDING_RETENTION_DAYS``:
    their rows are versioned or quarantined, and a raw file (whose name or content can identify a
    patient) has no reason to outlive that. Logged with counts only."""
    days = settings.landing_retention_days
    folder = settings.landing_dir / PROCESSED
    if not folder.is_dir():
        return PurgeResult(0, 0, days)
    cutoff = time.time() - days * 86400
    purged = kept = 0
    with data_registry.locked_registry(settings):  # an ingest archiving into a folder is not undercut
        for path in sorted(folder.rglob("*"), reverse=True):  # a folder's files come before the folder
            if path.is_dir():
                if not any(path.iterdir()):
                    path.rmdir()
            elif path.stat().st_mtime <= cutoff:
                path.unlink()
                purged += 1
            else:
                kept += 1
    if purged:
        log.info("landing retention (%g days): purged %d archived file(s), kept %d", days, purged, kept)
    return PurgeResult(purged, kept, days)
