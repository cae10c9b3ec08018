"""Shared fixtures: every test gets its own MEDOPS_HOME and fresh settings.

Airflow reads its configuration when first imported, so the test session's AIRFLOW_HOME (a
temporary folder with its own SQLite metadata DB) is set here, before any test imports Airflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="medops-test-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO_ROOT / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

from medops.core.settings import Settings, get_settings, reset_settings  # noqa: E402


@pytest.fixture
def medops_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """A temporary MEDOPS_HOME with settings rebuilt from it."""
    home = tmp_path / "medops-home"
    monkeypatch.setenv("MEDOPS_HOME", str(home))
    for name in list(os.environ):
        if name.startswith("MEDOPS_") and name != "MEDOPS_HOME":
            monkeypatch.delenv(name)
    reset_settings()
    yield get_settings()
    reset_settings()


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata DB for `dag.test()` runs (once per test session)."""
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        check=True,
        capture_output=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
    )
    return _AIRFLOW_HOME


@pytest.fixture(scope="session")
def seeded_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data registry with the seed as data-v1, built once and copied by `registry_home`."""
    home = tmp_path_factory.mktemp("seeded") / "medops-home"
    settings = Settings(home=home)
    from pipelines.data_registry import init_registry

    init_registry(settings)
    return home


@pytest.fixture
def registry_home(medops_home: Settings, seeded_registry: Path) -> Settings:
    """medops_home with a ready data registry (seed = data-v1) and its DVC remote."""
    import shutil

    shutil.copytree(seeded_registry, medops_home.home, symlinks=True)
    _rewrite_remote(medops_home)
    return medops_home


def _rewrite_remote(settings: Settings) -> None:
    config = settings.registry_dir / ".dvc" / "config"
    text = config.read_text()
    old = [line.split("=", 1)[1].strip() for line in text.splitlines() if line.strip().startswith("url")][0]
    config.write_text(text.replace(old, settings.dvc_remote_url))
