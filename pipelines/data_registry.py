"""The data registry: a git + DVC repository under ``MEDOPS_HOME`` whose tags are data versions.

``data/`` holds the seed and one immutable CSV per accepted batch; ``data.dvc`` points at it and
is pushed to the DVC remote; each version is a git commit tagged ``data-vN``. ``batches.json``
records every landed file's checksum and counts, so the same file never makes a second version.
Restore any version with ``medops data restore data-vN`` (``dvc get`` underneath).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from filelock import FileLock

from medops.core.settings import Settings
from pipelines import governance
from pipelines.data import read_data_dir, write_frame, write_seed
from pipelines.governance import SCHEDULER

TAG_PREFIX = "data-v"
MANIFEST = "batches.json"
GIT_IDENTITY = ["-c", "user.name=medops", "-c", "user.email=medops@localhost", "-c", "commit.gpgsign=false"]


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


def _lock(settings: Settings) -> FileLock:
    settings.home.mkdir(parents=True, exist_ok=True)
    return FileLock(str(settings.home / ".registry.lock"), timeout=600)


def version_number(tag: str) -> int:
    if not tag.startswith(TAG_PREFIX) or not tag[len(TAG_PREFIX) :].isdigit():
        raise ValueError(f"not a data version tag: {tag!r} (expected {TAG_PREFIX}N)")
    return int(tag[len(TAG_PREFIX) :])


def list_versions(settings: Settings) -> list[str]:
    """All data version tags, oldest first."""
    if not (settings.registry_dir / ".git").exists():
        return []
    tags = _git(settings.registry_dir, "tag", "--list", f"{TAG_PREFIX}*").split()
    return sorted((t for t in tags if t[len(TAG_PREFIX) :].isdigit()), key=version_number)


def latest_version(settings: Settings) -> str | None:
    versions = list_versions(settings)
    return versions[-1] if versions else None


def describe_version(tag: str, settings: Settings) -> DataVersion:
    """The DVC hash, row count and commit a tag stands for, read from the registry's history."""
    repo = settings.registry_dir
    pointer = yaml.safe_load(_git(repo, "show", f"{tag}:data.dvc"))
    out = pointer["outs"][0]
    manifest = json.loads(_git(repo, "show", f"{tag}:{MANIFEST}"))
    rows = sum(batch["accepted"] for batch in manifest["batches"])
    return DataVersion(tag=tag, dvc_md5=out["md5"], rows=rows, commit=_git(repo, "rev-list", "-n1", tag))


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


def _dvc_add_and_push(repo: Path) -> None:
    from dvc.repo import Repo

    with _quiet_dvc(), Repo(str(repo)) as dvc:
        dvc.add([str(repo / "data")])
        dvc.push()


def init_registry(settings: Settings, *, actor: str = SCHEDULER) -> DataVersion:
    """Create the registry with the seed as ``data-v1`` (idempotent: an existing registry is kept).

    Creating it is recorded in the audit trail as the first data version, by ``actor``.
    """
    repo = settings.registry_dir
    with _lock(settings):
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
            config["core"]["remote"] = "storage"
            config["core"]["autostage"] = True
            config["remote"]["storage"] = {"url": remote}
        seed = write_seed(repo / "data")
        manifest = {"batches": [_batch_record(seed.name, _sha256(seed), len(read_data_dir(repo / "data")), 0)]}
        (repo / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _dvc_add_and_push(repo)
        _git(repo, "add", "data.dvc", ".gitignore", MANIFEST, ".dvc/config", ".dvc/.gitignore")
        _git(repo, "commit", "-q", "-m", "data-v1: seed (Wisconsin diagnostic breast cancer data)")
        _git(repo, "tag", "-a", f"{TAG_PREFIX}1", "-m", "seed")
        version = describe_version(f"{TAG_PREFIX}1", settings)
        _record_version(version, actor, "seed: the Wisconsin diagnostic breast cancer data", settings, file=seed.name)
        return version


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksum(path: Path) -> str:
    """SHA-256 of a landed file, the key that makes ingest idempotent."""
    return _sha256(path)


def _batch_record(name: str, sha256: str, accepted: int, quarantined: int, **extra: object) -> dict:
    return {
        "file": name,
        "sha256": sha256,
        "accepted": accepted,
        "quarantined": quarantined,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }


def _manifest(settings: Settings) -> dict:
    return json.loads((settings.registry_dir / MANIFEST).read_text())


def find_batch(sha256: str, settings: Settings) -> dict | None:
    """The manifest record of a file already ingested, if any."""
    for record in _manifest(settings)["batches"]:
        if record["sha256"] == sha256:
            return record
    return None


def existing_row_keys(settings: Settings) -> np.ndarray:
    from pipelines.validate import row_keys

    return row_keys(read_data_dir(settings.registry_dir / "data"))


def record_batch(
    accepted: pd.DataFrame,
    *,
    source_name: str,
    sha256: str,
    quarantined: int,
    settings: Settings,
    origin: str = "landing",
    actor: str = SCHEDULER,
) -> DataVersion | None:
    """Append accepted rows as a new immutable batch file and tag the next data version.

    Returns the new version, or None when there were no accepted rows (the file is still
    recorded in the manifest so it is not taken again). Serialised by a lock: one writer at a time.
    A new version is recorded in the audit trail, by ``actor``.
    """
    repo = settings.registry_dir
    with _lock(settings):
        manifest = _manifest(settings)
        if any(record["sha256"] == sha256 for record in manifest["batches"]):
            return None
        tag = f"{TAG_PREFIX}{version_number(latest_version(settings) or 'data-v0') + 1}"
        record = _batch_record(source_name, sha256, len(accepted), quarantined, origin=origin)
        if len(accepted):
            record["version"] = tag
            record["data_file"] = f"batch-{sha256[:16]}.csv"
            write_frame(accepted, repo / "data" / record["data_file"])
        manifest["batches"].append(record)
        (repo / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if not len(accepted):
            _git(repo, "add", MANIFEST)
            _git(repo, "commit", "-q", "-m", f"record {source_name}: every row quarantined, no new version")
            return None
        _dvc_add_and_push(repo)
        _git(repo, "add", "data.dvc", MANIFEST)
        message = f"{tag}: {len(accepted)} rows from {source_name} ({origin})"
        _git(repo, "commit", "-q", "-m", message)
        _git(repo, "tag", "-a", tag, "-m", message)
        version = describe_version(tag, settings)
        _record_version(
            version,
            actor,
            f"{len(accepted)} rows from {source_name} ({origin})",
            settings,
            file=source_name,
            sha256=sha256,
            accepted=len(accepted),
            quarantined=quarantined,
            origin=origin,
        )
        return version


def _record_version(version: DataVersion, actor: str, reason: str, settings: Settings, **details: object) -> None:
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
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_dvc():
        Repo.get(str(settings.registry_dir), "data", out=str(dest), rev=tag)
    return dest


def load_version_frame(tag: str, settings: Settings) -> pd.DataFrame:
    """Every row of a data version, restored once into a cache under ``MEDOPS_HOME``."""
    cache = settings.home / "cache" / tag
    if not cache.exists():
        with _lock(settings):
            if not cache.exists():
                partial = cache.with_name(f".{tag}.partial")
                if partial.exists():
                    import shutil

                    shutil.rmtree(partial)
                restore_version(tag, partial, settings)
                partial.rename(cache)
    return read_data_dir(cache)


def version_info(tag: str, settings: Settings) -> dict:
    return asdict(describe_version(tag, settings))
