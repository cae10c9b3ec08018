"""The one supervisor of every long-running process medops starts: start, find, wait for, stop.

A process starts detached, in its own session (a Ctrl-C meant for the caller must not reach it),
its output appended to a log under ``MEDOPS_HOME/run/``, and is remembered by its pid and the
kernel's start time of that pid, so that a pid recycled after a crash is never signalled. Stopping
signals the process's group, then terminates by pid whatever outlived it (descendants in sessions
of their own, such as ``bentoml serve``'s workers), so nothing keeps running after ``make stop``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import psutil

from medops.core.files import write_atomically
from medops.core.settings import REPO_ROOT, Settings

T = TypeVar("T")
R = TypeVar("R", bound="ProcessRecord")

logger = logging.getLogger("medops.processes")

PLATFORM_MARKER = "MEDOPS_PLATFORM"
PICKLE_SWITCH = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
SAME_PROCESS_SECONDS = 1.0  # start times of one process, read twice, differ by less
ORPHAN_GRACE_SECONDS = 2.0  # how long descendants may outlive the process that should have stopped them
KILL_GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL for processes signalled one by one


# Test-only fault injection (tests/test_ingest_crashes.py, tests/test_rollout_crashes.py): a process
# whose environment names a step in MEDOPS_TEST_CRASH_AT ends at once when it reaches that step.
# Never set in production.
CRASH_AT_VARIABLE = "MEDOPS_TEST_CRASH_AT"
CRASH_EXIT_CODE = 86


def crash_point(step: str) -> None:
    """End the process on the spot at ``step`` if ``MEDOPS_TEST_CRASH_AT`` names it (tests only)."""
    # os._exit skips every finally block and exit handler, as a power cut or a kill -9 does
    if os.environ.get(CRASH_AT_VARIABLE) == step:
        os._exit(CRASH_EXIT_CODE)


# Waiting ----------------------------------------------------------------------------------------------
def poll_until(check: Callable[[], T], timeout: float, interval: float) -> T:
    """Call ``check`` every ``interval`` seconds until it returns something truthy or ``timeout``
    seconds have passed; return its last value. An exception from ``check`` ends the wait at once."""
    import tenacity

    return tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_fixed(interval),
        retry=tenacity.retry_if_result(lambda value: not value),
        retry_error_callback=lambda state: state.outcome.result(),
    )(check)


def wait_until(
    check: Callable[[], T],
    timeout: float,
    what: str,
    poll: float = 1.0,
    alive: Callable[[], bool] | None = None,
    hint: str = "see its log under MEDOPS_HOME/run/",
) -> T:
    """Poll ``check`` until it returns something truthy, and return that; ``RuntimeError`` as soon as
    ``alive`` says the process waited for exited, ``TimeoutError`` after ``timeout`` seconds."""

    def attempt() -> T:
        value = check()
        if not value and alive is not None and not alive():
            raise RuntimeError(f"{what}: the process exited; {hint}")
        return value

    value = poll_until(attempt, timeout, poll)
    if not value:
        raise TimeoutError(f"{what}: not ready after {timeout:.0f}s; {hint}")
    return value


def http_ok(url: str, timeout: float = 3.0) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code < 500
    except httpx.HTTPError:
        return False


# Environment ------------------------------------------------------------------------------------------
def venv_bin() -> Path:
    return Path(sys.executable).parent


def child_env(settings: Settings, extra: dict[str, str] | None = None, *, service_keys: bool = True) -> dict[str, str]:
    """The environment of every process medops starts: this venv first on PATH, ``settings`` as
    ``MEDOPS_*`` (they win over what this process inherited), and the platform marker :func:`strays`
    looks for. ``service_keys=False`` leaves the service's keys and MLflow's login out (the UIs)."""
    fields = {f"MEDOPS_{name.upper()}" for name in type(settings).model_fields}
    env = {key: value for key, value in os.environ.items() if key not in fields}
    for name, value in settings.model_dump().items():  # what rebuilds ``settings`` in the child
        if value is not None:
            env[f"MEDOPS_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    if not service_keys:
        for name in ("MEDOPS_API_KEYS", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(name, None)
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env[PLATFORM_MARKER] = str(settings.home)
    env["BENTOML_HOME"] = str(settings.bentoml_home)  # BentoML reads its store's place once per process
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    # No process medops starts unpickles a model: pickled artifacts run code (pipelines.model_trust).
    env[PICKLE_SWITCH] = "false"
    return env


# Records ----------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ProcessRecord:
    """A process this supervisor started: the pid with its start time (a recycled pid has another)."""

    pid: int
    create_time: float
    log: str
    started_at: str
    log_offset: int = 0  # where this start's output begins in the (appended) log


def record_path(name: str, settings: Settings) -> Path:
    return settings.run_dir / f"{name}.json"


def write_record(name: str, record: ProcessRecord, settings: Settings) -> None:
    write_atomically(record_path(name, settings), json.dumps(asdict(record), indent=2))


def read_record(name: str, settings: Settings, kind: type[R] = ProcessRecord) -> R | None:
    try:
        return kind(**json.loads(record_path(name, settings).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def forget_record(name: str, settings: Settings) -> None:
    record_path(name, settings).unlink(missing_ok=True)


def running(name: str, settings: Settings) -> ProcessRecord | None:
    """The record of ``name`` if that very process still runs."""
    record = read_record(name, settings)
    return record if record is not None and is_running(record) else None


# Starting ---------------------------------------------------------------------------------------------
def start_detached(argv: Sequence[str], *, log: Path, env: dict[str, str], cwd: Path) -> ProcessRecord:
    """Start ``argv`` in a session of its own, its output appended to ``log``; returns at once."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        offset = handle.tell()
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ProcessRecord(
        pid=process.pid,
        create_time=psutil.Process(process.pid).create_time(),
        log=str(log),
        started_at=datetime.now(UTC).isoformat(),
        log_offset=offset,
    )


def start(
    name: str, argv: Sequence[str], settings: Settings, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT
) -> int:
    """Start a platform process unless it already runs; returns its pid. Its log is ``run/<name>.log``."""
    if (current := running(name, settings)) is not None:
        return current.pid
    record = start_detached(argv, log=settings.run_dir / f"{name}.log", env=env or child_env(settings), cwd=cwd)
    write_record(name, record, settings)
    return record.pid


# Finding ----------------------------------------------------------------------------------------------
def leader(record: ProcessRecord) -> psutil.Process | None:
    """The process ``record`` describes, if it still runs and its pid was not given to another."""
    try:
        process = psutil.Process(record.pid)
        if abs(process.create_time() - record.create_time) > SAME_PROCESS_SECONDS:
            return None
    except psutil.Error:
        return None
    return process if alive([process]) else None


def is_running(record: ProcessRecord) -> bool:
    return leader(record) is not None


def descendants(record: ProcessRecord) -> list[psutil.Process]:
    """Every live process below ``record``'s, whatever session it moved to."""
    if (process := leader(record)) is None:
        return []
    try:
        return alive(process.children(recursive=True))
    except psutil.Error:
        return []


def alive(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` still running; a zombie is not running (and one of ours is reaped)."""
    found = []
    for process in processes:
        try:
            if not process.is_running():
                continue
            if process.status() == psutil.STATUS_ZOMBIE:
                _reap(process.pid)
                continue
        except psutil.Error:
            continue
        found.append(process)
    return found


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # not our child: its parent, or init, reaps it
        os.waitpid(pid, os.WNOHANG)


# Stopping ---------------------------------------------------------------------------------------------
def stop_process(record: ProcessRecord, timeout: float = 30.0) -> list[int]:
    """Stop the process of ``record`` and everything it started; returns the pids that survived.

    SIGTERM to its group (or to it alone when it left its group); its descendants get what is left
    of ``timeout``, at most :data:`ORPHAN_GRACE_SECONDS`, then are terminated and killed by pid.
    """
    if (head := leader(record)) is None:
        return []
    try:
        family = [head, *head.children(recursive=True)]
    except psutil.Error:
        family = [head]
    with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
        if os.getpgid(head.pid) == head.pid:
            os.killpg(head.pid, signal.SIGTERM)
        else:
            head.send_signal(signal.SIGTERM)
    started = time.monotonic()
    poll_until(lambda: not alive([head]), timeout, 0.1)
    left = max(0.0, timeout - (time.monotonic() - started))
    poll_until(lambda: not alive(family), min(left, ORPHAN_GRACE_SECONDS), 0.1)
    stragglers = alive(family)
    # Airflow's components take longer than the grace on their SIGTERM; a worker in a session of
    # its own that its parent did not stop gets here too
    for process in stragglers:
        logger.info("terminating process %s left over by pid %s", process.pid, record.pid)
    return terminate(stragglers)


def terminate(targets: Iterable[int | psutil.Process], timeout: float = KILL_GRACE_SECONDS) -> list[int]:
    """SIGTERM each process (or pid), wait up to ``timeout`` for all, SIGKILL the rest; returns the
    pids still alive. A ``psutil.Process`` is signalled only if its pid still names that process."""
    processes = []
    for target in targets:
        try:
            process = target if isinstance(target, psutil.Process) else psutil.Process(target)
            process.terminate()
        except psutil.Error:
            continue
        processes.append(process)
    poll_until(lambda: not alive(processes), timeout, 0.1)
    for process in alive(processes):
        with contextlib.suppress(psutil.Error):
            process.kill()
    poll_until(lambda: not alive(processes), 2.0, 0.05)
    return [process.pid for process in alive(processes)]


def stop(name: str, settings: Settings, timeout: float = 30.0) -> bool:
    """Stop the platform process ``name`` and all it started; False if it was not running."""
    record = read_record(name, settings)
    forget_record(name, settings)
    if record is None or not is_running(record):
        return False
    if survivors := stop_process(record, timeout=timeout):
        logger.error("%s: processes %s survived SIGKILL", name, survivors)
    return True


def strays(settings: Settings) -> list[int]:
    """Live processes the platform started for this MEDOPS_HOME: they carry ``MEDOPS_PLATFORM`` in
    their environment (set by `medops up` and inherited by every child). Never this process or its
    ancestors, so a shell that happens to carry the variable is safe."""
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
    terminate(pids, timeout=timeout)
    return pids
