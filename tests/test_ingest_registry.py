"""Ingest into the real git + DVC data registry: versions, quarantine, idempotence, restore."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from medops.core.settings import Settings
from pipelines import data_registry
from pipelines.data import seed_frame
from pipelines.ingest import ingest_file, ingest_landing, landing_files


def _new_rows(n: int = 40, shift: float = 0.37) -> pd.DataFrame:
    frame = seed_frame().iloc[100 : 100 + n].copy()
    frame["mean_radius"] = frame["mean_radius"] + shift  # new cases, not copies of the seed
    return frame.reset_index(drop=True)


def test_init_registry_is_the_seed_as_data_v1(registry_home: Settings):
    assert data_registry.list_versions(registry_home) == ["data-v1"]
    info = data_registry.describe_version("data-v1", registry_home)
    assert info.rows == 569
    committed = Path(__file__).resolve().parents[1] / "data.dvc"
    assert info.dvc_md5 in committed.read_text()
    # idempotent
    assert data_registry.init_registry(registry_home).commit == info.commit


def test_batch_with_bad_rows_versions_good_ones_and_quarantines_the_rest(registry_home: Settings, tmp_path: Path):
    frame = _new_rows().astype(str)
    frame.loc[3, "mean_area"] = "251000"
    frame.loc[5, "mean_radius"] = "twelve"
    path = tmp_path / "site-b-2026-11.csv"
    frame.to_csv(path, index=False)

    result = ingest_file(path, registry_home)

    assert (result.received, result.accepted, result.quarantined) == (40, 38, 2)
    assert result.version == "data-v2" and result.status == "versioned"
    rows = pd.read_csv(Path(result.quarantine_path) / "rows.csv")
    assert list(rows["row_number"]) == [5, 7]
    assert rows["reason"].str.contains("mean_area: out of plausible range").any()
    summary = json.loads((Path(result.quarantine_path) / "summary.json").read_text())
    assert summary["received"] == 40 and summary["quarantined"] == 2
    assert len(data_registry.load_version_frame("data-v2", registry_home)) == 569 + 38
    # the DVC remote holds the new version: dvc status against it is clean
    status = subprocess.run(["dvc", "status", "-c", "-q"], cwd=registry_home.registry_dir, capture_output=True)
    assert status.returncode == 0


def test_same_file_twice_makes_no_second_version(registry_home: Settings, tmp_path: Path):
    path = tmp_path / "batch.csv"
    _new_rows().to_csv(path, index=False)
    first = ingest_file(path, registry_home)
    second = ingest_file(path, registry_home)
    assert first.version == "data-v2"
    assert second.status == "already_ingested" and second.version == "data-v2"
    assert data_registry.list_versions(registry_home) == ["data-v1", "data-v2"]


def test_resent_rows_under_a_new_name_are_quarantined_as_duplicates(registry_home: Settings, tmp_path: Path):
    path = tmp_path / "again.csv"
    seed_frame().head(30).to_csv(path, index=False)
    result = ingest_file(path, registry_home)
    assert result.status == "all_rows_quarantined" and result.version is None
    assert (result.accepted, result.quarantined) == (0, 30)
    assert data_registry.list_versions(registry_home) == ["data-v1"]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.csv", b"", "empty file"),
        ("scan.csv", bytes(range(256)) * 8, "binary content"),
        ("names.csv", None, "unknown column(s) patient_name"),
        ("nosite.csv", "drop-site", "missing required column(s): site_id"),
    ],
)
def test_unusable_files_are_quarantined_whole(registry_home: Settings, tmp_path: Path, name, content, reason):
    path = tmp_path / name
    if content is None:
        frame = _new_rows(5)
        frame["patient_name"] = "Jane Roe"
        frame.to_csv(path, index=False)
    elif content == "drop-site":
        _new_rows(5).drop(columns=["site_id"]).to_csv(path, index=False)
    else:
        path.write_bytes(content)

    result = ingest_file(path, registry_home)

    assert result.status == "rejected_whole" and reason in result.reason
    kept = Path(result.quarantine_path) / f"{result.sha256}.csv"  # named by its hash, not by its name
    assert kept.read_bytes() == path.read_bytes()  # nothing lost: the file is kept byte for byte
    assert Path(name).stem not in str(kept)
    assert data_registry.list_versions(registry_home) == ["data-v1"]
    assert "Jane" not in (Path(result.quarantine_path) / "summary.json").read_text()


def test_landing_folder_per_site_and_archive(registry_home: Settings):
    site_folder = registry_home.landing_dir / "site-d"
    site_folder.mkdir(parents=True)
    _new_rows(12).drop(columns=["site_id"]).to_csv(site_folder / "week-47.csv", index=False)
    (registry_home.landing_dir / "partial.csv.part").write_text("still being written")
    assert [p.name for p in landing_files(registry_home)] == ["week-47.csv"]

    [result] = ingest_landing(registry_home)

    assert result.version == "data-v2"
    assert set(data_registry.load_version_frame("data-v2", registry_home).tail(12)["site_id"]) == {"site-d"}
    assert (registry_home.landing_dir / "processed" / "site-d" / "week-47.csv").exists()
    assert landing_files(registry_home) == []


def test_restore_gives_back_the_exact_rows_of_a_version(registry_home: Settings, tmp_path: Path):
    path = tmp_path / "batch.csv"
    _new_rows().to_csv(path, index=False)
    ingest_file(path, registry_home)
    restored = data_registry.restore_version("data-v1", tmp_path / "v1", registry_home)
    assert sorted(p.name for p in restored.iterdir()) == ["seed.csv"]
    assert (restored / "seed.csv").read_bytes() == (registry_home.registry_dir / "data" / "seed.csv").read_bytes()
    with pytest.raises(ValueError, match="unknown data version data-v9"):
        data_registry.restore_version("data-v9", tmp_path / "v9", registry_home)


def _git_log(settings: Settings) -> str:
    return subprocess.check_output(["git", "log", "--all", "--format=%B"], cwd=settings.registry_dir, text=True)


def test_landed_file_with_identifiers_is_moved_into_private_quarantine_under_its_hash(registry_home: Settings):
    site_folder = registry_home.landing_dir / "site-a"
    site_folder.mkdir(parents=True)
    frame = _new_rows(6).drop(columns=["site_id"])
    frame["patient_name"], frame["mrn"] = "Jane Roe", "MRN-0042"
    landed = site_folder / "roe-jane-mrn0042.csv"
    frame.to_csv(landed, index=False)
    content = landed.read_bytes()

    [result] = ingest_landing(registry_home)

    assert result.status == "rejected_whole" and "unknown column(s)" in result.reason
    # moved, not copied: nothing of it stays readable in the landing folder or its archive
    assert not landed.exists()
    assert not [p for p in (registry_home.landing_dir / "processed").rglob("*") if p.is_file()]
    folder = Path(result.quarantine_path)
    stored = folder / f"{result.sha256}.csv"
    assert stored.read_bytes() == content
    assert "roe" not in folder.name.lower() and sorted(p.name for p in folder.iterdir()) == sorted(
        [stored.name, "summary.json"]
    )
    for path in (registry_home.quarantine_dir, folder):
        assert path.stat().st_mode & 0o777 == 0o700
    for path in (stored, folder / "summary.json"):
        assert path.stat().st_mode & 0o777 == 0o600
    # the original name only in the private summary, for whoever reviews the quarantine
    assert json.loads((folder / "summary.json").read_text())["file"] == landed.name
    # never in the registry's history, the result handed to logs, or the summary line
    committed = subprocess.check_output(["git", "show", "HEAD:batches.json"], cwd=registry_home.registry_dir)
    for text in (_git_log(registry_home), committed.decode(), json.dumps(result.to_dict()), result.summary()):
        assert "roe" not in text.lower() and "mrn0042" not in text.lower()
    assert result.sha256[:12] in _git_log(registry_home)

    # the same file sent again is not archived either: it joins the quarantine
    site_folder.mkdir(exist_ok=True)
    landed.write_bytes(content)
    [again] = ingest_landing(registry_home)
    assert again.status == "already_ingested" and not landed.exists()
    assert (Path(again.quarantine_path) / stored.name).read_bytes() == content
    assert not [p for p in (registry_home.landing_dir / "processed").rglob("*") if p.is_file()]


def test_commit_messages_and_manifest_name_batches_by_checksum_and_site(registry_home: Settings):
    site_folder = registry_home.landing_dir / "site-d"
    site_folder.mkdir(parents=True)
    frame = _new_rows(10).drop(columns=["site_id"]).astype(str)
    frame.loc[2, "mean_area"] = "251000"
    frame.to_csv(site_folder / "smith-john-followup.csv", index=False)

    [result] = ingest_landing(registry_home)

    message = subprocess.check_output(
        ["git", "log", "-1", "--format=%B", "data-v2"], cwd=registry_home.registry_dir, text=True
    )
    assert result.sha256[:12] in message and "site-d" in message
    committed = subprocess.check_output(["git", "show", "data-v2:batches.json"], cwd=registry_home.registry_dir)
    for text in (_git_log(registry_home), committed.decode(), result.summary(), json.dumps(result.to_dict())):
        assert "smith" not in text.lower()
    folder = Path(result.quarantine_path)
    assert "smith" not in folder.name and (folder / "rows.csv").stat().st_mode & 0o777 == 0o600
    archived = registry_home.landing_dir / "processed" / "site-d"
    assert archived.stat().st_mode & 0o777 == 0o700


def test_archived_landed_files_are_purged_after_the_retention_with_counts_only_logged(
    registry_home: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    import logging
    import os
    import time

    from typer.testing import CliRunner

    from medops.app.cli import app
    from medops.core.settings import get_settings, reset_settings
    from pipelines.ingest import purge_landing

    processed = registry_home.landing_dir / "processed"
    old = processed / "site-a" / "doe-john-week-40.csv"
    recent = processed / "week-47.csv"
    for path in (old, recent):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("rows")
    month_ago = time.time() - 31 * 86400
    os.utime(old, (month_ago, month_ago))

    assert registry_home.landing_retention_days == 30
    with caplog.at_level(logging.INFO, logger="pipelines.ingest"):
        result = purge_landing(registry_home)
    assert (result.purged, result.kept) == (1, 1)
    assert not old.exists() and not old.parent.exists() and recent.exists()
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "purged 1" in logged and "doe" not in logged and "week" not in logged

    # every ingest purges too, and so does the command, with the retention from the environment
    os.utime(recent, (month_ago, month_ago))
    assert ingest_landing(registry_home) == [] and not recent.exists()
    recent.write_text("rows")
    monkeypatch.setenv("MEDOPS_LANDING_RETENTION_DAYS", "0")
    reset_settings()
    assert get_settings().landing_retention_days == 0
    output = CliRunner().invoke(app, ["data", "purge-landing", "--json"])
    assert output.exit_code == 0, output.output
    assert json.loads(output.stdout)["purged"] == 1 and not recent.exists()


def test_a_worker_host_reads_versions_from_the_registrys_git_remote_and_the_dvc_remote(
    registry_home: Settings, tmp_path: Path
):
    """A host without the registry (the cluster's train workers) clones its git remote into its own
    MEDOPS_HOME, fetches new tags before each read, and fills a DVC cache of its own from the remote."""
    worker = Settings(
        home=tmp_path / "worker-host",
        registry_url=str(registry_home.registry_dir),  # a git URL: git://… in the cluster
        dvc_remote=registry_home.dvc_remote_url,
    )
    assert data_registry.registry_repo(registry_home) == registry_home.registry_dir  # its own host: no clone
    assert data_registry.list_versions(worker) == ["data-v1"]
    clone = data_registry.registry_repo(worker)
    assert clone == worker.home / "registry-clone" and (clone / ".git").is_dir()
    assert data_registry.describe_version("data-v1", worker) == data_registry.describe_version("data-v1", registry_home)

    path = tmp_path / "batch.csv"
    _new_rows().to_csv(path, index=False)
    ingest_file(path, registry_home)  # a new version on the registry's host, after the clone
    frame = data_registry.load_version_frame("data-v2", worker)
    pd.testing.assert_frame_equal(frame, data_registry.load_version_frame("data-v2", registry_home))
    cached = [p for p in (clone / ".dvc" / "cache").rglob("*") if p.is_file()]
    assert cached, "the worker's DVC cache was not filled from the remote"
    assert not (worker.home / "registry").exists() and not (worker.home / "secrets").exists()
