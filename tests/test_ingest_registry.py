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
    kept = Path(result.quarantine_path) / name
    assert kept.read_bytes() == path.read_bytes()  # nothing lost: the file is kept byte for byte
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
