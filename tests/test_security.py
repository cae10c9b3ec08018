"""Secrets and file modes: what a hospital's compliance review checks first."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from medops.core.settings import Settings


def _read_key(home: str, barrier, results) -> None:
    barrier.wait()
    results.put(Settings(home=Path(home)).service_api_keys()[0])


def test_concurrent_first_runs_agree_on_one_key(tmp_path: Path):
    """Two workers starting together used to generate two different keys; one must win."""
    context = multiprocessing.get_context("fork")
    for attempt in range(5):
        home = tmp_path / f"home-{attempt}"
        barrier, results = context.Barrier(4), context.Queue()
        workers = [context.Process(target=_read_key, args=(str(home), barrier, results)) for _ in range(4)]
        for worker in workers:
            worker.start()
        keys = {results.get(timeout=30) for _ in workers}
        for worker in workers:
            worker.join(timeout=30)
        assert len(keys) == 1 and all(keys), keys
        assert (home / "secrets" / "api_key").read_text().strip() == keys.pop()
        assert [p.name for p in (home / "secrets").iterdir()] == ["api_key"]  # no partial left


def test_secrets_are_private_and_an_empty_one_is_refused(tmp_path: Path):
    settings = Settings(home=tmp_path / "home")
    key = settings.service_api_keys()[0]
    assert len(key) >= 40
    assert stat.S_IMODE(settings.secrets_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((settings.secrets_dir / "api_key").stat().st_mode) == 0o600
    assert settings.encounter_hash_key() != key.encode()
    (settings.secrets_dir / "encounter_hash_key").write_text("\n")
    with pytest.raises(RuntimeError, match="is empty"):
        settings.encounter_hash_key()


def test_the_medops_command_creates_private_files(medops_home: Settings, tmp_path: Path):
    from typer.testing import CliRunner

    from medops.app.cli import app

    before = os.umask(0o022)
    try:
        result = CliRunner().invoke(app, ["data", "seed", "--out", str(tmp_path / "seed")])
        assert result.exit_code == 0, result.output
        mode = stat.S_IMODE((tmp_path / "seed" / "seed.csv").stat().st_mode)
        assert mode & 0o077 == 0, oct(mode)
    finally:
        os.umask(before)
