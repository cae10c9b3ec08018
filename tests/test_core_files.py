"""medops.core.files: a crash never leaves half a file, the lock keeps a second process out,
secrets are never readable by others, the checksum is SHA-256."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
from pathlib import Path

import pytest
from filelock import Timeout

from medops.core.files import atomic_writer, file_lock, sha256_file, write_atomically


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomically_replaces_the_content_and_leaves_no_temporary_file(tmp_path: Path):
    path = tmp_path / "state" / "alerts.json"
    write_atomically(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n'
    write_atomically(path, b"\x00binary")
    assert path.read_bytes() == b"\x00binary"
    assert [p.name for p in path.parent.iterdir()] == ["alerts.json"]


def test_a_crash_before_the_rename_keeps_the_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "batches.json"
    path.write_text("old\n")

    def crash(*args: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        write_atomically(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["batches.json"]


def test_an_exception_while_writing_keeps_the_old_content(tmp_path: Path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError), atomic_writer(path) as handle:
        handle.write(b"a,b\n")
        raise ValueError("formatting failed half way")
    assert path.read_text() == "a,b\n1,2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["data.csv"]


def test_modes_follow_the_umask_unless_given(tmp_path: Path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert _mode(write_atomically(tmp_path / "state.json", "x")) == _mode(plain)
    assert _mode(write_atomically(tmp_path / "api_key", "secret", mode=0o600)) == 0o600


def test_without_overwrite_the_first_writer_wins(tmp_path: Path):
    path = tmp_path / "encounter_hash_key"
    write_atomically(path, "first\n", mode=0o600, overwrite=False)
    with pytest.raises(FileExistsError):
        write_atomically(path, "second\n", mode=0o600, overwrite=False)
    assert path.read_text() == "first\n"
    assert [p.name for p in tmp_path.iterdir()] == ["encounter_hash_key"]


def test_a_generated_secret_is_private_and_stable(medops_home):
    key = medops_home.service_api_keys()[0]
    path = medops_home.secrets_dir / "api_key"
    assert _mode(path) == 0o600 and path.read_text() == key + "\n"
    assert medops_home.service_api_keys() == [key]


def _hold_lock(path: str, held, release) -> None:
    with file_lock(Path(path)):
        held.set()
        release.wait(30)


def test_the_lock_keeps_a_second_process_out(tmp_path: Path):
    lock_path = tmp_path / "run" / "deploy.lock"
    context = multiprocessing.get_context("spawn")
    held, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(lock_path), held, release))
    holder.start()
    try:
        assert held.wait(60), "the other process never took the lock"
        with pytest.raises(Timeout), file_lock(lock_path, timeout=0.3):
            pass
        release.set()
        holder.join(30)
        with file_lock(lock_path, timeout=5):  # free again once the holder let go
            assert holder.exitcode == 0
    finally:
        release.set()
        holder.join(5)
        if holder.is_alive():
            holder.kill()


def test_sha256_file_is_hashlibs_sha256(tmp_path: Path):
    path = tmp_path / "landing.csv"
    data = os.urandom(3 * (1 << 20) + 17)  # several read blocks and a ragged end
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
