"""Writing, locking and fingerprinting files, once for every part of the platform.

A reader sees a file's old content or its new content, never half of it: the bytes go to a hidden
temporary file in the same directory (hidden, so the landing watcher never takes it for a finished
file), reach the disk, and take the file's name in one ``os.replace``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from filelock import BaseFileLock

_CREATED = 0o666  # what open() asks for; the umask takes away the rest, as for any other file


@contextlib.contextmanager
def atomic_writer(path: Path, *, mode: int | None = None, overwrite: bool = True) -> Iterator[IO[bytes]]:
    """A binary handle whose content becomes ``path`` when the block ends without an exception.

    ``mode`` sets the file's permissions exactly (``0o600`` for a secret); without it the umask
    decides, as for a plain ``open``. With ``overwrite=False`` an existing ``path`` is kept and
    ``FileExistsError`` raised, so that concurrent first writers agree on one content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.urandom(6).hex()}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _CREATED if mode is None else mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(partial, path)
        else:
            os.link(partial, path)  # fails if the name exists, unlike rename
            partial.unlink()
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_atomically(path: Path, data: bytes | str, *, mode: int | None = None, overwrite: bool = True) -> Path:
    """Replace ``path``'s content with ``data`` (text as UTF-8) in one step; see :func:`atomic_writer`."""
    with atomic_writer(path, mode=mode, overwrite=overwrite) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable: it lives in the directory's entries."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        # some filesystems refuse to fsync a directory; the data itself is on disk
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


def file_lock(path: Path, timeout: float = -1, *, reentrant: bool = False) -> BaseFileLock:
    """A lock shared by every process that names ``path``; ``with file_lock(p, 30):`` waits at most 30 s
    (a negative ``timeout`` as long as it takes). ``reentrant=True`` hands every caller in the process
    the same lock object: a second object for the same path would wait for the first one forever
    (flock is per open file, not per process)."""
    from filelock import FileLock

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=timeout, is_singleton=reentrant)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks so a large file never sits in memory whole."""
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
