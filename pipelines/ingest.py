"""Ingest: validate a landed batch, quarantine what fails, version what passes.

Nothing a hospital sends is dropped: every row ends in a data version or in quarantine with its
reason, and ``accepted + quarantined == received`` for every file. A file that is not usable at
all is kept whole in quarantine with the reason. The same file landing twice is recognised by
its checksum and makes no second version.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from medops.core.settings import Settings
from pipelines import data_registry
from pipelines.governance import SCHEDULER
from pipelines.validate import REASON, BatchRejected, read_batch, validate_batch

PROCESSED = "processed"
CLAIMED = ".claimed"
PARTIAL = (".part", ".tmp")


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
        if self.status == "already_ingested":
            return f"{self.file}: already ingested ({self.reason}); no new version"
        if self.status == "rejected_whole":
            return f"{self.file}: quarantined whole: {self.reason} -> {self.quarantine_path}"
        line = f"{self.file}: received {self.received}, accepted {self.accepted}, quarantined {self.quarantined}"
        return line + (f" -> {self.version}" if self.version else " -> no new version")


def _waiting(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and not p.name.endswith(PARTIAL)]


def landing_files(settings: Settings) -> list[Path]:
    """Files waiting in the landing folder or in a per-site subfolder ``landing/<site_id>/``.

    Hidden files and partially written ones (``.part``, ``.tmp``) are left alone until renamed.
    """
    root = settings.landing_dir
    if not root.exists():
        return []
    files = _waiting(root)
    for folder in root.iterdir():
        if folder.is_dir() and not folder.name.startswith(".") and folder.name != PROCESSED:
            files.extend(_waiting(folder))
    return sorted(files)


def landing_site(path: Path, settings: Settings) -> str | None:
    """The site a file was dropped for: its subfolder's name, None for the landing root."""
    return path.parent.name if path.parent != settings.landing_dir else None


def _quarantine_dir(name: str, sha256: str, settings: Settings) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    folder = settings.quarantine_dir / f"{stamp}-{sha256[:12]}-{Path(name).stem[:40]}"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def quarantine_batch(rejected: pd.DataFrame, *, name: str, sha256: str, received: int, settings: Settings) -> Path:
    """Write rejected rows (as received, with row number and reason) and a summary of reasons."""
    folder = _quarantine_dir(name, sha256, settings)
    rejected.to_csv(folder / "rows.csv", index=False)
    reasons = rejected[REASON].str.split("; ").explode().str.split(":").str[0].value_counts()
    summary = {
        "file": name,
        "sha256": sha256,
        "received": received,
        "quarantined": len(rejected),
        "rows_by_reason": {str(k): int(v) for k, v in reasons.items()},
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return folder


def quarantine_file(path: Path, *, sha256: str, reason: str, settings: Settings) -> Path:
    """Keep an unusable file whole, byte for byte, next to the reason it was refused."""
    folder = _quarantine_dir(path.name, sha256, settings)
    shutil.copy2(path, folder / path.name)
    summary = {"file": path.name, "sha256": sha256, "reason": reason, "whole_file": True}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return folder


def ingest_file(path: Path, settings: Settings, site_id: str | None = None, *, actor: str = SCHEDULER) -> IngestResult:
    """Validate one file and record its rows: accepted into a new data version, the rest quarantined.

    A new data version is recorded in the audit trail by ``actor``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    data_registry.init_registry(settings, actor=actor)
    sha256 = data_registry.file_checksum(path)
    previous = data_registry.find_batch(sha256, settings)
    if previous is not None:
        where = previous.get("version") or "no version: every row was quarantined"
        return IngestResult(path.name, sha256, "already_ingested", 0, 0, 0, previous.get("version"), reason=where)
    try:
        raw = read_batch(path)
        result = validate_batch(raw, site_id=site_id, existing_keys=data_registry.existing_row_keys(settings))
    except BatchRejected as rejected:
        folder = quarantine_file(path, sha256=sha256, reason=str(rejected), settings=settings)
        data_registry.record_batch(
            pd.DataFrame(), source_name=path.name, sha256=sha256, quarantined=0, settings=settings, actor=actor
        )
        return IngestResult(
            path.name, sha256, "rejected_whole", 0, 0, 0, quarantine_path=str(folder), reason=str(rejected)
        )
    folder = None
    if len(result.rejected):
        folder = quarantine_batch(
            result.rejected, name=path.name, sha256=sha256, received=result.received, settings=settings
        )
    version = data_registry.record_batch(
        result.accepted,
        source_name=path.name,
        sha256=sha256,
        quarantined=len(result.rejected),
        settings=settings,
        actor=actor,
    )
    assert len(result.accepted) + len(result.rejected) == result.received
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


def archive_landed(path: Path, settings: Settings) -> Path:
    """Move a processed file out of the landing folder, keeping it (nothing is deleted)."""
    relative = path.relative_to(settings.landing_dir)
    target = settings.landing_dir / PROCESSED / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target = target.with_name(f"{target.stem}.{os.getpid()}.{datetime.now(UTC):%Y%m%d%H%M%S%f}{target.suffix}")
    shutil.move(str(path), target)
    (settings.landing_dir / CLAIMED / str(relative).replace(os.sep, "__")).unlink(missing_ok=True)
    return target


def ingest_landing(settings: Settings, site_id: str | None = None, *, actor: str = SCHEDULER) -> list[IngestResult]:
    """Ingest every file waiting in the landing folder, oldest name first, archiving each after."""
    results = []
    for path in landing_files(settings):
        results.append(ingest_file(path, settings, site_id=site_id or landing_site(path, settings), actor=actor))
        archive_landed(path, settings)
    return results


def result_dict(result: IngestResult) -> dict:
    return asdict(result)
