"""The data registry: a git + DVC repository under ``MEDOPS_HOME`` whose tags are data versions.

``data/`` holds the seed and one immutable CSV per accepted batch; ``data.dvc`` points at it and
is pushed to the DVC remote; each version is a git commit tagged ``data-vN``. ``batches.json``
records every landed file's checksum and counts, so the same file never makes a second version.
Restore any version with ``medops data restore data-vN`` (``dvc get`` underneath).

Nothing is lost or counted twice at any crash point. One writer at a time holds the registry lock
(:func:`locked_registry`) for a whole ingest, duplicate checks included. An ingest first writes a
journal entry (``MEDOPS_HOME/state/ingest-journal/<sha256>.json``), notes each thing before creating
it, and runs: quarantine, batch file, manifest, ``dvc add``, ``dvc push``, one git commit of
``data.dvc`` and the manifest, the tag. Only the committed manifest counts, and a record naming a
version only once its tag exists. Whoever takes the lock next first settles what a crash left: an
ingest that committed gets its tag (and its audit entry, by the actor its journal noted); any other
is rolled back (``data.dvc``, the manifest and ``.gitignore`` reset to the last commit, the batch
file removed, the quarantine put back), so every received row ends exactly once in a version or in
quarantine. Every data version is an entry in the audit trail, written once its tag exists.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import yaml

from medops.core.files import file_lock, sha256_file, write_atomically
from medops.core.processes import crash_point
from medops.core.settings import Settings
from pipelines import governance
from pipelines.data import read_data_dir, write_frame, write_seed
from pipelines.governance import SCHEDULER

if TYPE_CHECKING:
    from filelock import BaseFileLock

TAG_PREFIX = "data-v"
MANIFEST = "batches.json"
REMOTE = "storage"  # the DVC remote's name in the registry's .dvc/config
GIT_IDENTITY = ["-c", "user.name=medops", "-c", "user.email=medops@localhost", "-c", "commit.gpgsign=false"]
# What an ingest changes in the registry's working tree (dvc add rewrites the pointer and may touch .gitignore).
INGEST_CHANGES = ("data.dvc", MANIFEST, ".gitignore")
# What a git killed mid-command leaves behind; none of ours runs while we hold the registry lock.
GIT_LOCKS = ("index.lock", "HEAD.lock", "packed-refs.lock", "refs/heads/*.lock", "refs/tags/*.lock")

# Where tests/test_ingest_crashes.py ends an ingest (medops.core.processes.crash_point).
CRASH_POINTS = (
    "after_journal",
    "after_quarantine",
    "after_write",
    "after_manifest",
    "after_dvc_add",
    "after_push",
    "after_commit",
    "after_tag",
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataVersion:
    """A tagged data version and the DVC hash of its ``data/`` directory."""

    tag: str
    dvc_md5: str
    rows: int
    commit: str


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", *GIT_IDENTITY, *args], cwd=repo, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {result.stderr.strip()}")
    return result.stdout.strip()


def _lock(settings: Settings) -> BaseFileLock:
    # Reentrant: an ingest holds it throughout and its journal (journaled) takes it again.
    return file_lock(settings.home / ".registry.lock", timeout=600, reentrant=True)


# Journals of the ingests this process has in progress: settling them is their owner's business.
_open_journals: set[Path] = set()


@contextlib.contextmanager
def locked_registry(settings: Settings) -> Iterator[None]:
    """Hold the registry lock (one writer at a time, across processes), crash leftovers settled first."""
    with _lock(settings):
        recover_interrupted(settings)
        yield


@dataclass
class IngestJournal:
    """The journal entry of one ingest in progress: what it is about to create, noted beforehand."""

    path: Path
    entry: dict = field(default_factory=dict)

    def note(self, **fields: object) -> None:
        """Record what the ingest is about to create, durably, before it creates it."""
        self.entry.update(fields)
        write_atomically(self.path, json.dumps(self.entry, indent=1, default=str) + "\n", mode=0o600)


@contextlib.contextmanager
def journaled(sha256: str, settings: Settings) -> Iterator[IngestJournal]:
    """Journal the ingest of one batch under the registry lock: an error rolls back what it created (or,
    once committed, finishes it) and is raised again; a crash leaves the entry for the next lock holder."""
    with locked_registry(settings):
        folder = settings.ingest_journal_dir
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        journal = IngestJournal(folder / f"{sha256}.json")
        journal.note(sha256=sha256, pid=os.getpid(), started_at=datetime.now(UTC).isoformat(timespec="seconds"))
        _open_journals.add(journal.path)
        try:
            crash_point("after_journal")
            yield journal
        except BaseException:
            _open_journals.discard(journal.path)
            outcome = _settle(journal.entry, settings)  # if this fails too, the entry stays for the next start
            journal.path.unlink(missing_ok=True)
            log.warning("ingest of batch %s failed and was %s", sha256[:12], outcome)
            raise
        _open_journals.discard(journal.path)
        journal.path.unlink(missing_ok=True)


def recover_interrupted(settings: Settings) -> None:
    """Finish or roll back every ingest a crash interrupted (call with the registry lock held)."""
    folder = settings.ingest_journal_dir
    if not folder.is_dir() or not (settings.registry_dir / ".git").exists():
        return
    for path in sorted(folder.glob("*.json")):
        if path in _open_journals:
            continue
        entry = json.loads(path.read_text())
        outcome = _settle(entry, settings)
        path.unlink()
        log.warning("an interrupted ingest of batch %s was %s", entry["sha256"][:12], outcome)


def _settle(entry: dict, settings: Settings) -> str:
    """Finish an ingest that committed (tag it), roll back any other; safe to run twice."""
    repo = settings.registry_dir
    for pattern in GIT_LOCKS:
        for stale in (repo / ".git").glob(pattern):
            stale.unlink()
    record = _committed_record(entry["sha256"], settings)
    if record is not None:
        tag = record.get("version")
        if tag and tag not in list_versions(settings):
            _git(repo, "tag", "-a", tag, "-m", entry.get("message") or f"{tag}: batch {entry['sha256'][:12]}", "HEAD")
        if tag:
            _record_version(
                describe_version(tag, settings),
                entry.get("actor") or SCHEDULER,
                (entry.get("message") or tag) + " (finished after an interrupted ingest)",
                settings,
                sha256=entry["sha256"],
            )
        return "finished"
    # Only what an ingest changes goes back to HEAD: an operator's edit elsewhere (a new DVC remote
    # in .dvc/config) is not an ingest's to undo.
    _git(repo, "reset", "-q", "HEAD", "--", *INGEST_CHANGES)
    _git(repo, "checkout", "-q", "HEAD", "--", *INGEST_CHANGES)
    if entry.get("data_file"):
        (repo / "data" / entry["data_file"]).unlink(missing_ok=True)
    for folder in (repo, repo / "data"):
        for partial in folder.glob(".*.partial"):  # an atomic write cut short
            partial.unlink()
    _restore_quarantine(entry, settings)
    return "rolled back"


def _restore_quarantine(entry: dict, settings: Settings) -> None:
    """Undo a quarantine the ingest created: a file moved into it goes back where it was received."""
    if not entry.get("quarantine"):
        return
    folder = Path(entry["quarantine"])
    if settings.quarantine_dir.resolve() not in folder.resolve().parents:
        raise RuntimeError(f"journal of batch {entry['sha256'][:12]} names a folder outside quarantine: {folder}")
    moved_from, moved_to = entry.get("moved_from"), entry.get("moved_to")
    if moved_from and moved_to and Path(moved_to).exists() and not Path(moved_from).exists():
        Path(moved_from).parent.mkdir(parents=True, exist_ok=True)
        os.replace(moved_to, moved_from)
    shutil.rmtree(folder, ignore_errors=True)


def registry_repo(settings: Settings) -> Path:
    """The git repository data versions are read from: the registry itself, or on a host without it
    (``MEDOPS_REGISTRY_URL``: the cluster's train workers) a clone of the registry's git remote under
    this host's own ``MEDOPS_HOME``, made or fetched first. The clone is never written to but by git."""
    if not settings.registry_url:
        return settings.registry_dir
    clone = settings.registry_clone_dir
    with _lock(settings):  # tasks side by side on one worker: one clone or fetch at a time
        if (clone / ".git").exists():
            _git(clone, "fetch", "--quiet", "--tags", "--force", "--prune", "origin")
        else:
            partial = clone.with_name(f".{clone.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            settings.home.mkdir(parents=True, exist_ok=True)
            _git(settings.home, "clone", "--quiet", settings.registry_url, str(partial))
            partial.rename(clone)
    return clone


def version_number(tag: str) -> int:
    if not tag.startswith(TAG_PREFIX) or not tag[len(TAG_PREFIX) :].isdigit():
        raise ValueError(f"not a data version tag: {tag!r} (expected {TAG_PREFIX}N)")
    return int(tag[len(TAG_PREFIX) :])


def list_versions(settings: Settings) -> list[str]:
    """All data version tags, oldest first."""
    repo = registry_repo(settings)
    if not (repo / ".git").exists():
        return []
    tags = _git(repo, "tag", "--list", f"{TAG_PREFIX}*").split()
    return sorted((t for t in tags if t[len(TAG_PREFIX) :].isdigit()), key=version_number)


def latest_version(settings: Settings) -> str | None:
    versions = list_versions(settings)
    return versions[-1] if versions else None


def describe_version(tag: str, settings: Settings) -> DataVersion:
    """The DVC hash, row count and commit a tag stands for, read from the registry's history."""
    repo = registry_repo(settings)
    pointer = yaml.safe_load(_git(repo, "show", f"{tag}:data.dvc"))
    manifest = json.loads(_git(repo, "show", f"{tag}:{MANIFEST}"))
    rows = sum(batch["accepted"] for batch in manifest["batches"])
    return DataVersion(tag=tag, dvc_md5=pointer["outs"][0]["md5"], rows=rows, commit=_git(repo, "rev-list", "-n1", tag))


@contextlib.contextmanager
def _quiet_dvc():
    """DVC's hints for humans ("to track changes with git, run ...") are noise here; errors still raise."""
    logger = logging.getLogger("dvc")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _dvc_add(repo: Path) -> None:
    from dvc.repo import Repo

    with _quiet_dvc(), Repo(str(repo)) as dvc:
        dvc.add([str(repo / "data")])


def _dvc_push(repo: Path) -> None:
    from dvc.repo import Repo

    with _quiet_dvc(), Repo(str(repo)) as dvc:
        dvc.push()


def init_registry(settings: Settings, *, actor: str = SCHEDULER) -> DataVersion:
    """Create the registry with the seed as ``data-v1``, audited by ``actor``; an existing one is kept."""
    repo = settings.registry_dir
    with locked_registry(settings):  # settles an ingest a crash interrupted, at every start
        if latest_version(settings):
            return describe_version(list_versions(settings)[0], settings)
        from dvc.repo import Repo

        repo.mkdir(parents=True, exist_ok=True)
        _git(repo, "init", "-q", "-b", "main")
        with _quiet_dvc():
            Repo.init(str(repo), force=True).close()
        remote = settings.dvc_remote_url
        if "://" not in remote:
            Path(remote).mkdir(parents=True, exist_ok=True)
        with _quiet_dvc(), Repo(str(repo)) as dvc, dvc.config.edit() as config:
            config["core"]["remote"] = REMOTE
            config["core"]["autostage"] = True
            config["remote"][REMOTE] = {"url": remote}
        seed = write_seed(repo / "data")
        manifest = {"batches": [_batch_record(seed.name, sha256_file(seed), len(read_data_dir(repo / "data")), 0)]}
        write_atomically(repo / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        _dvc_add(repo)
        _dvc_push(repo)
        _git(repo, "add", "data.dvc", ".gitignore", MANIFEST, ".dvc/config", ".dvc/.gitignore")
        _git(repo, "commit", "-q", "-m", "data-v1: seed (Wisconsin diagnostic breast cancer data)")
        _git(repo, "tag", "-a", f"{TAG_PREFIX}1", "-m", "seed")
        version = describe_version(f"{TAG_PREFIX}1", settings)
        _record_version(version, actor, "seed: the Wisconsin diagnostic breast cancer data", settings, source=seed.name)
        return version


def _batch_record(source: str, sha256: str, accepted: int, quarantined: int, **extra: object) -> dict:
    at = datetime.now(UTC).isoformat(timespec="seconds")
    return {"source": source, "sha256": sha256, "accepted": accepted, "quarantined": quarantined, "at": at, **extra}


def _committed_record(sha256: str, settings: Settings) -> dict | None:
    """The record of a batch in the committed manifest (the working tree's may be ahead of it)."""
    manifest = json.loads(_git(settings.registry_dir, "show", f"HEAD:{MANIFEST}"))
    return next((record for record in manifest["batches"] if record["sha256"] == sha256), None)


def find_batch(sha256: str, settings: Settings) -> dict | None:
    """The record of a file already ingested, if any: committed, and tagged if it made a version."""
    record = _committed_record(sha256, settings)
    if record is not None and record.get("version") and record["version"] not in list_versions(settings):
        raise RuntimeError(
            f"batch {sha256[:12]} is committed as {record['version']} but the tag is missing; "
            "the registry needs repair (git tag it at the commit that records it)"
        )
    return record


def existing_row_keys(settings: Settings) -> np.ndarray:
    from pipelines.validate import row_keys

    return row_keys(read_data_dir(settings.registry_dir / "data"))


def _sites(accepted: pd.DataFrame) -> str:
    sites = sorted(accepted["site_id"].astype(str).unique()) if "site_id" in accepted.columns else []
    return ", ".join(sites[:5]) + (f" and {len(sites) - 5} more" if len(sites) > 5 else "")


def record_batch(
    accepted: pd.DataFrame,
    *,
    source_name: str,
    sha256: str,
    quarantined: int,
    settings: Settings,
    journal: IngestJournal,
    origin: str = "landing",
    actor: str = SCHEDULER,
) -> DataVersion | None:
    """Append accepted rows as a new immutable batch file and tag the next data version (audited by ``actor``).

    Returns the new version, or None when no row was accepted (the file is still recorded in the
    manifest so it is not taken again). ``source_name`` goes into the manifest and the commit message,
    so it must name no one: ingest passes the checksum's prefix and the site, never a landed file's name.
    """
    repo = settings.registry_dir
    manifest = json.loads((repo / MANIFEST).read_text())
    if any(record["sha256"] == sha256 for record in manifest["batches"]):
        return None
    tag = f"{TAG_PREFIX}{version_number(latest_version(settings) or 'data-v0') + 1}"
    record = _batch_record(source_name, sha256, len(accepted), quarantined, origin=origin)
    if len(accepted):
        record["version"] = tag
        record["data_file"] = f"batch-{sha256[:16]}.csv"
        message = f"{tag}: {len(accepted)} rows from {source_name} (sites {_sites(accepted)}; {origin})"
        journal.note(tag=tag, data_file=record["data_file"], message=message, actor=actor)
        write_frame(accepted, repo / "data" / record["data_file"])
        crash_point("after_write")
    manifest["batches"].append(record)
    write_atomically(repo / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    crash_point("after_manifest")
    if not len(accepted):
        _git(repo, "add", MANIFEST)
        _git(repo, "commit", "-q", "-m", f"record {source_name}: every row quarantined, no new version")
        crash_point("after_commit")
        return None
    _dvc_add(repo)
    crash_point("after_dvc_add")
    _dvc_push(repo)
    crash_point("after_push")
    # data.dvc and the manifest in one commit: the pointer and the record agree in every commit.
    _git(repo, "add", "data.dvc", MANIFEST)
    _git(repo, "commit", "-q", "-m", message)
    crash_point("after_commit")
    _git(repo, "tag", "-a", tag, "-m", message)
    crash_point("after_tag")
    version = describe_version(tag, settings)
    _record_version(
        version, actor, message, settings, sha256=sha256, accepted=len(accepted), quarantined=quarantined, origin=origin
    )
    return version


def _record_version(version: DataVersion, actor: str, reason: str, settings: Settings, **details: object) -> None:
    """The data version's audit entry, once: an ingest finished after a crash may reach here twice."""
    from medops.core import audit

    if any(
        entry.action == "data_version" and entry.links.get("data_version") == version.tag
        for entry in audit.entries(settings)
    ):
        return
    governance.record(
        "data_version",
        actor=actor,
        reason=reason,
        settings=settings,
        links={"data_version": version.tag, "data_dvc_md5": version.dvc_md5, "registry_commit": version.commit},
        details={"rows": version.rows, **details},
    )


def restore_version(tag: str, dest: Path, settings: Settings) -> Path:
    """Restore the exact ``data/`` of a version into ``dest`` from the DVC remote (``dvc get``)."""
    from dvc.repo import Repo

    version_number(tag)
    if tag not in list_versions(settings):
        raise ValueError(f"unknown data version {tag}; known: {', '.join(list_versions(settings)) or 'none'}")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty")
    dest.parent.mkdir(parents=True, exist_ok=True)
    repo = registry_repo(settings)
    with _quiet_dvc():
        if settings.registry_url:  # a worker host: its own DVC cache, filled from the remote this host is given
            remote = {"core": {"remote": REMOTE}, "remote": {REMOTE: {"url": settings.dvc_remote_url}}}
            with Repo(str(repo), config=remote) as dvc:
                dvc.fetch(revs=[tag], workspace=False)
        Repo.get(str(repo), "data", out=str(dest), rev=tag)
    return dest


def load_version_frame(tag: str, settings: Settings) -> pd.DataFrame:
    """Every row of a data version, restored once into a cache under ``MEDOPS_HOME`` (on a worker
    host, from the DVC remote through its clone of the registry: :func:`registry_repo`)."""
    cache = settings.home / "cache" / tag
    if not cache.exists():
        with _lock(settings):
            if not cache.exists():
                partial = cache.with_name(f".{tag}.partial")
                if partial.exists():
                    shutil.rmtree(partial)
                restore_version(tag, partial, settings)
                partial.rename(cache)
    return read_data_dir(cache)


def version_info(tag: str, settings: Settings) -> dict:
    return asdict(describe_version(tag, settings))
