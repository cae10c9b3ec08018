"""Start and stop the long-running processes of the platform, tracked by pid files.

Each process starts in its own session with its output in ``MEDOPS_HOME/run/<name>.log``.
Stopping sends SIGTERM to the process's whole group, waits, then SIGKILLs what is left,
so nothing keeps running after `make stop` or a test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import httpx

from medops.core.settings import REPO_ROOT, Settings

T = TypeVar("T")

PLATFORM_MARKER = "MEDOPS_PLATFORM"


def venv_bin() -> Path:
    import sys

    return Path(sys.executable).parent


def child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for platform processes: the venv first on PATH and MEDOPS_HOME made absolute."""
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env["MEDOPS_HOME"] = str(settings.home)
    env[PLATFORM_MARKER] = str(settings.home)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def pid_file(name: str, settings: Settings) -> Path:
    return settings.run_dir / f"{name}.pid"


def read_pid(name: str, settings: Settings) -> int | None:
    path = pid_file(name, settings)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if is_alive(pid) else None


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def start(
    name: str, argv: Sequence[str], settings: Settings, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT
) -> int:
    """Start a process in its own session unless it already runs; returns its pid."""
    running = read_pid(name, settings)
    if running:
        return running
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    log = open(settings.run_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
    process = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=env or child_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    pid_file(name, settings).write_text(str(process.pid))
    return process.pid


def stop_pid(pid: int, timeout: float = 30.0, group: bool = True) -> None:
    """SIGTERM the process (and its group), wait, then SIGKILL whatever is left."""

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    send(signal.SIGTERM)
    if timeout <= 0:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    if group:
        send(signal.SIGKILL)  # stragglers of the group, even when the leader is gone
    elif is_alive(pid):
        send(signal.SIGKILL)


def stop(name: str, settings: Settings, timeout: float = 30.0) -> bool:
    pid = read_pid(name, settings)
    pid_file(name, settings).unlink(missing_ok=True)
    if pid is None:
        return False
    stop_pid(pid, timeout=timeout)
    return True


def strays(settings: Settings) -> list[int]:
    """Live processes the platform started for this MEDOPS_HOME: they carry ``MEDOPS_PLATFORM`` in
    their environment (set by `medops up` and inherited by every child). Never this process or its
    ancestors, so a shell that happens to carry the variable is safe."""
    import psutil

    me = psutil.Process()
    spared = {me.pid, *(parent.pid for parent in me.parents())}
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid in spared or process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.environ().get(PLATFORM_MARKER) == str(settings.home):
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_strays(settings: Settings, timeout: float = 20.0) -> list[int]:
    """SIGTERM, then SIGKILL, whatever is still running for this MEDOPS_HOME (task runners, workers)."""
    pids = strays(settings)
    for pid in pids:
        stop_pid(pid, timeout=0, group=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        if is_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    return pids


def wait_until(
    check: Callable[[], T],
    timeout: float,
    what: str,
    poll: float = 1.0,
    alive: Callable[[], bool] | None = None,
    hint: str = "see its log under MEDOPS_HOME/run/",
) -> T:
    """Poll ``check`` until it returns something truthy, and return that.

    Raises ``RuntimeError`` as soon as ``alive`` says the process being waited for has exited, and
    ``TimeoutError`` after ``timeout`` seconds; both messages name ``what`` and end with ``hint``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the process exited; {hint}")
        time.sleep(poll)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s; {hint}")


def http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code < 500
    except httpx.HTTPError:
        return False
