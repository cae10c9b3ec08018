"""Shared fixtures: every test gets its own MEDOPS_HOME and fresh settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from medops.settings import Settings, get_settings, reset_settings


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
