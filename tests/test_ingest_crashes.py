"""Ingest killed at every step, then retried: every received row ends exactly once in a version or in quarantine.

The ingest runs in a child process whose ``MEDOPS_TEST_CRASH_AT`` names a step
(``pipelines.data_registry.CRASH_POINTS``): it ends there with ``os._exit``, which runs no
``finally``, no ``except`` and no exit handler, as a power cut would. The retry then runs in this
(another) process, as the DAG's retry or the next ``medops ingest`` would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from medops.core.files import sha256_file
from medops.core.processes import CRASH_AT_VARIABLE, CRASH_EXIT_CODE
from medops.core.settings import Settings
from pipelines import data_registry
from pipelines.data import seed_frame
from pipelines.ingest import ingest_file, ingest_landing

REPO_ROOT = Path(__file__).resolve().parents[1]
SITE = "site-b"
BAD_ROWS = (3, 5)  # 0-based rows made invalid; quarantine numbers them from 2 (the header is line 1)


def _mixed_batch(path: Path, n: int = 40, shift: float = 0.37) -> Path:
    """``n`` new cases for SITE, two of them invalid."""
    frame = seed_frame().iloc[100 : 100 + n].copy().reset_index(drop=True)
    frame["mean_radius"] = frame["mean_radius"] + shift
    frame = frame.drop(columns=["site_id"]).astype(str)
    frame.loc[BAD_ROWS[0], "mean_area"] = "251000"
    frame.loc[BAD_ROWS[1], "mean_radius"] = "twelve"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def _identifier_file(path: Path) -> Path:
    frame = seed_frame().iloc[200:205].copy()
    frame["patient_name"] = "Jane Roe"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def _child_env(settings: Settings, crash_at: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDOPS_")}
    env["MEDOPS_HOME"] = str(settings.home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if crash_at:
        env[CRASH_AT_VARIABLE] = crash_at
    return env


LANDING_CHILD = (
    "from medops.core.settings import get_settings\n"
    "from pipelines.ingest import ingest_landing\n"
    "print([r.status for r in ingest_landing(get_settings())])\n"
)


def _run_landing_ingest(settings: Settings, crash_at: str | None = None) -> subprocess.CompletedProcess:
    """What the DAG's task runs, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-c", LANDING_CHILD],
        env=_child_env(settings, crash_at),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _committed_manifest(settings: Settings) -> list[dict]:
    repo = settings.registry_dir
    text = subprocess.run(["git", "show", "HEAD:batches.json"], cwd=repo, capture_output=True, text=True, check=True)
    return json.loads(text.stdout)["batches"]


def _uncommitted(repo: Path) -> list[str]:
    changes = subprocess.check_output(["git", "status", "--porcelain"], cwd=repo, text=True).splitlines()
    return [line for line in changes if line[3:] != ".dvc/config"]  # the fixture points it at this test's remote


def _assert_registry_consistent(settings: Settings, tmp_path: Path) -> list[str]:
    """Versions contiguous; manifest, tags, working tree and DVC remote agree; nothing half-done."""
    repo = settings.registry_dir
    versions = data_registry.list_versions(settings)
    assert versions == [f"data-v{i}" for i in range(1, len(versions) + 1)]
    records = _committed_manifest(settings)
    assert [r["version"] for r in records if r.get("version")] == versions[1:]
    assert len({r["sha256"] for r in records}) == len(records)  # no file recorded twice
    for tag in versions[1:]:  # each tag's commit records its own version
        tagged = json.loads(subprocess.check_output(["git", "show", f"{tag}:batches.json"], cwd=repo))
        assert tagged["batches"][-1]["version"] == tag
    assert _uncommitted(repo) == []
    assert not list(settings.ingest_journal_dir.glob("*.json"))
    # the DVC remote holds what HEAD points at
    assert subprocess.run(["dvc", "status", "-c", "-q"], cwd=repo, capture_output=True).returncode == 0
    restored = data_registry.restore_version(versions[-1], tmp_path / f"restored-{versions[-1]}", settings)
    assert sorted(p.name for p in restored.iterdir()) == sorted(p.name for p in (repo / "data").iterdir())
    return versions


def _quarantines_of(sha256: str, settings: Settings) -> list[Path]:
    if not settings.quarantine_dir.exists():
        return []
    return sorted(settings.quarantine_dir.glob(f"*-{sha256[:12]}"))


@pytest.mark.parametrize("step", data_registry.CRASH_POINTS)
def test_batch_killed_at_each_step_ends_exactly_once_after_a_retry(registry_home: Settings, tmp_path: Path, step):
    landed = _mixed_batch(registry_home.landing_dir / SITE / "week-48.csv")
    sha256, received = sha256_file(landed), 40

    crashed = _run_landing_ingest(registry_home, crash_at=step)
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr
    assert list(registry_home.ingest_journal_dir.glob("*.json")), "the crash left its journal entry"

    ingest_landing(registry_home)  # the retry, in another process

    versions = _assert_registry_consistent(registry_home, tmp_path)
    assert versions == ["data-v1", "data-v2"]
    [record] = [r for r in _committed_manifest(registry_home) if r["sha256"] == sha256]
    assert (record["accepted"], record["quarantined"], record["version"]) == (38, 2, "data-v2")
    restored = tmp_path / "restored-data-v2"
    batch = pd.read_csv(restored / record["data_file"])
    assert len(batch) == 38 and set(batch["site_id"]) == {SITE}
    assert len(pd.read_csv(restored / "seed.csv")) + len(batch) == len(
        data_registry.load_version_frame("data-v2", registry_home)
    )
    [quarantine] = _quarantines_of(sha256, registry_home)  # one quarantine, not one per attempt
    rows = pd.read_csv(quarantine / "rows.csv")
    assert sorted(rows["row_number"]) == [row + 2 for row in BAD_ROWS]
    assert len(batch) + len(rows) == received
    # the landed file left the landing folder once, into processed/
    assert not landed.exists()
    assert [p.name for p in (registry_home.landing_dir / "processed" / SITE).iterdir()] == ["week-48.csv"]


@pytest.mark.parametrize("step", ["after_journal", "after_quarantine", "after_manifest", "after_commit"])
def test_identifier_file_killed_at_each_step_is_quarantined_once_and_never_archived(
    registry_home: Settings, tmp_path: Path, step
):
    landed = _identifier_file(registry_home.landing_dir / SITE / "roe-jane-labs.csv")
    content, sha256 = landed.read_bytes(), sha256_file(landed)

    crashed = _run_landing_ingest(registry_home, crash_at=step)
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr

    ingest_landing(registry_home)

    assert _assert_registry_consistent(registry_home, tmp_path) == ["data-v1"]
    assert [r["sha256"] for r in _committed_manifest(registry_home)].count(sha256) == 1
    [quarantine] = _quarantines_of(sha256, registry_home)
    assert (quarantine / f"{sha256}.csv").read_bytes() == content
    assert not landed.exists()
    processed = registry_home.landing_dir / "processed"
    assert not processed.exists() or not [p for p in processed.rglob("*") if p.is_file()]


def test_medops_init_settles_an_interrupted_ingest(registry_home: Settings, tmp_path: Path):
    landed = _mixed_batch(registry_home.landing_dir / SITE / "week-49.csv")
    crashed = _run_landing_ingest(registry_home, crash_at="after_push")
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr
    assert _uncommitted(registry_home.registry_dir)

    data_registry.init_registry(registry_home)

    # rolled back: nothing of the half-done version remains, and the file waits to be ingested again
    assert _assert_registry_consistent(registry_home, tmp_path) == ["data-v1"]
    assert not _quarantines_of(sha256_file(landed), registry_home)
    assert not (registry_home.registry_dir / "data" / f"batch-{sha256_file(landed)[:16]}.csv").exists()
    assert [r.version for r in ingest_landing(registry_home)] == ["data-v2"]


def test_a_failed_push_rolls_back_and_the_retry_versions_the_file(
    registry_home: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = _mixed_batch(tmp_path / "batch.csv")
    sha256 = sha256_file(path)

    def unreachable(repo: Path) -> None:
        raise RuntimeError("dvc push: remote unreachable")

    with monkeypatch.context() as patch:
        patch.setattr(data_registry, "_dvc_push", unreachable)
        with pytest.raises(RuntimeError, match="remote unreachable"):
            ingest_file(path, registry_home, site_id=SITE)

    # not reported as ingested, nothing half-written left behind
    assert data_registry.find_batch(sha256, registry_home) is None
    assert _assert_registry_consistent(registry_home, tmp_path) == ["data-v1"]
    assert not _quarantines_of(sha256, registry_home)

    result = ingest_file(path, registry_home, site_id=SITE)
    assert (result.status, result.version, result.accepted, result.quarantined) == ("versioned", "data-v2", 38, 2)
    assert len(_quarantines_of(sha256, registry_home)) == 1


def test_concurrent_cli_and_landing_ingests_all_land_with_distinct_versions(registry_home: Settings, tmp_path: Path):
    first = _mixed_batch(tmp_path / "a.csv", n=30, shift=0.41)
    second = _mixed_batch(registry_home.landing_dir / "site-c" / "b.csv", n=25, shift=0.53)
    first_sha, second_sha = sha256_file(first), sha256_file(second)
    cli = [sys.executable, "-m", "medops.app.cli", "ingest", str(first), "--site", SITE, "--json"]
    env = _child_env(registry_home)
    children = [
        subprocess.Popen(cli, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen(cli, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),  # same file again
        subprocess.Popen(
            [sys.executable, "-c", LANDING_CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ),
    ]
    outputs = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0, 0], outputs

    cli_statuses = sorted(json.loads(out)["status"] for out, _ in outputs[:2])
    assert cli_statuses == ["already_ingested", "versioned"]  # the duplicate check ran under the lock
    assert _assert_registry_consistent(registry_home, tmp_path) == ["data-v1", "data-v2", "data-v3"]
    records = {r["sha256"]: r for r in _committed_manifest(registry_home)}
    assert {records[first_sha]["version"], records[second_sha]["version"]} == {"data-v2", "data-v3"}
    assert len(data_registry.load_version_frame("data-v3", registry_home)) == 569 + 28 + 23
    assert len(_quarantines_of(first_sha, registry_home)) == len(_quarantines_of(second_sha, registry_home)) == 1


def test_feedback_versioning_is_journaled_like_an_ingest(registry_home: Settings, monkeypatch: pytest.MonkeyPatch):
    from pipelines import retraining

    labelled = seed_frame().iloc[300:320].copy().reset_index(drop=True)
    labelled["mean_radius"] += 0.29
    labelled.loc[4, "mean_area"] = 251000.0
    monkeypatch.setattr(retraining, "labelled_feedback_batch", lambda settings, since=None: labelled.copy())

    def unreachable(repo: Path) -> None:
        raise RuntimeError("dvc push: remote unreachable")

    with monkeypatch.context() as patch:
        patch.setattr(data_registry, "_dvc_push", unreachable)
        with pytest.raises(RuntimeError, match="remote unreachable"):
            retraining.version_feedback(registry_home)
    assert data_registry.list_versions(registry_home) == ["data-v1"]
    assert not registry_home.quarantine_dir.exists() or not list(registry_home.quarantine_dir.iterdir())
    assert not list(registry_home.ingest_journal_dir.glob("*.json"))

    assert retraining.version_feedback(registry_home) == "data-v2"
    [record] = [r for r in _committed_manifest(registry_home) if r.get("origin") == "feedback"]
    assert (record["accepted"], record["quarantined"]) == (19, 1)
    assert len(list(registry_home.quarantine_dir.iterdir())) == 1
