"""Start, find and stop ``bentoml serve`` processes without leaking any.

``bentoml serve`` becomes a circus arbiter whose workers each run in their own session: a
SIGTERM to the arbiter stops them all gracefully, but a process-group kill or a SIGKILL of the
arbiter leaves them running. So a server is stopped by SIGTERM to the arbiter's pid, then we wait
and verify that every process it had started is gone (terminating stragglers one by one, by pid).
Each server's pid, start time, port, Bento and model version are kept in a JSON file under
``settings.run_dir``; the start time guards against signalling a recycled pid.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

from medops.core.settings import Settings
from serving.contract import SERVICE_NAME
from serving.control import CONTROL_ENV

logger = logging.getLogger("medops.serving")


class ServerStartError(RuntimeError):
    """A server did not become ready (it exited, or readiness timed out)."""


@dataclass
class ServerRecord:
    role: str
    pid: int
    create_time: float
    port: int
    host: str
    bento: str
    model_version: str
    log: str
    control_dir: str | None
    started_at: str
    log_offset: int = 0  # where this start's output begins in the (appended) log

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def record_path(settings: Settings, role: str) -> Path:
    return settings.run_dir / f"serving-{role}.json"


def write_record(settings: Settings, record: ServerRecord) -> None:
    path = record_path(settings, record.role)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2))
    os.replace(tmp, path)


def read_record(settings: Settings, role: str) -> ServerRecord | None:
    try:
        return ServerRecord(**json.loads(record_path(settings, role).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def forget_record(settings: Settings, role: str) -> None:
    record_path(settings, role).unlink(missing_ok=True)


def find_free_port(host: str = "127.0.0.1") -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def settings_env(settings: Settings) -> dict[str, str]:
    """``MEDOPS_*`` variables reproducing ``settings`` in a child process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[f"MEDOPS_{name.upper()}"] = str(value)
    return env


def child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for BentoML children: this venv on PATH, its stores, the caller's settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MEDOPS_")}
    env.update(settings_env(settings))
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    env["BENTOML_HOME"] = str(settings.bentoml_home)
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env.update(extra or {})
    return env


def start_server(
    settings: Settings,
    *,
    bento: str,
    model_version: str,
    port: int,
    role: str,
    control_dir: Path | None = None,
    workers: int | None = None,
) -> ServerRecord:
    """Start ``bentoml serve <bento>`` on loopback ``port`` in its own session; returns at once."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.run_dir / f"serving-{role}.log"
    extra = {
        "BENTOML_CONFIG_OPTIONS": f"services.{SERVICE_NAME}.workers={workers or settings.serving_workers}",
        "MEDOPS_SERVING_BENTO": bento,
    }
    if control_dir is not None:
        control_dir.mkdir(parents=True, exist_ok=True)
        extra[CONTROL_ENV] = str(control_dir)
    command = [
        sys.executable, "-m", "bentoml", "serve", bento, "--host", settings.host, "--port", str(port),
    ]  # fmt: skip
    with log_path.open("ab") as log:
        log_offset = log.tell()
        process = subprocess.Popen(
            command,
            env=child_env(settings, extra),
            cwd=settings.run_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C meant for the caller must not reach the server
        )
    record = ServerRecord(
        role=role,
        pid=process.pid,
        create_time=psutil.Process(process.pid).create_time(),
        port=port,
        host=settings.host,
        bento=bento,
        model_version=str(model_version),
        log=str(log_path),
        control_dir=str(control_dir) if control_dir else None,
        started_at=datetime.now(UTC).isoformat(),
        log_offset=log_offset,
    )
    write_record(settings, record)
    logger.info("started %s server pid %s on port %s (%s)", role, process.pid, port, bento)
    return record


def _process(record: ServerRecord) -> psutil.Process | None:
    """The arbiter of ``record`` if it is still that very process (not a recycled pid)."""
    try:
        process = psutil.Process(record.pid)
        if abs(process.create_time() - record.create_time) > 1.0:
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            _reap(record.pid)
            return None
        return process
    except psutil.Error:
        return None


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def is_running(record: ServerRecord) -> bool:
    return _process(record) is not None


def worker_pids(record: ServerRecord) -> list[int]:
    process = _process(record)
    if process is None:
        return []
    try:
        return [child.pid for child in process.children(recursive=True) if child.is_running()]
    except psutil.Error:
        return []


STARTUP_FAILED = "Application startup failed"  # what a BentoML worker logs when the service cannot start


def startup_failure(record: ServerRecord) -> str | None:
    """The error a worker of this start died of, from its log (circus would restart it forever)."""
    try:
        with open(record.log, "rb") as log:
            log.seek(record.log_offset)
            text = log.read().decode("utf-8", "replace")
    except OSError:
        return None
    if STARTUP_FAILED not in text:
        return None
    errors = re.findall(r"^(\w+(?:\.\w+)*(?:Error|Exception|Exit)\b.*)$", text, flags=re.MULTILINE)
    return errors[-1].strip() if errors else STARTUP_FAILED


def wait_ready(record: ServerRecord, timeout: float = 90.0) -> None:
    """Wait until ``/readyz`` answers 200; raise ServerStartError as soon as it cannot happen."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not is_running(record):
                raise ServerStartError(f"{record.role} server exited during start; see {record.log}")
            if (failure := startup_failure(record)) is not None:
                raise ServerStartError(f"{record.role} server cannot start: {failure} (see {record.log})")
            try:
                if client.get(f"{record.url}/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise ServerStartError(f"{record.role} server not ready within {timeout:.0f} s; see {record.log}")


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            continue
    return alive


def stop_server(record: ServerRecord, settings: Settings | None = None, timeout: float = 30.0) -> None:
    """SIGTERM the arbiter, wait for it and every process it started; raise if any survives."""
    arbiter = _process(record)
    if arbiter is None:
        if settings is not None:
            forget_record(settings, record.role)
        return
    try:
        children = arbiter.children(recursive=True)
    except psutil.Error:
        children = []
    try:
        arbiter.send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        pass
    # circus stops its workers before the arbiter exits; workers outliving it get a short grace
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive([arbiter]):
        _reap(record.pid)
        time.sleep(0.1)
    _reap(record.pid)
    grace = min(1.0, max(0.0, deadline - time.monotonic())) + 0.2
    psutil.wait_procs(_alive(children), timeout=grace)
    stragglers = _alive([arbiter, *children])
    for process in stragglers:  # only ones this server started, each by its own pid
        logger.warning("terminating leftover process %s of %s server", process.pid, record.role)
        try:
            process.terminate()
        except psutil.Error:
            pass
    gone, still = psutil.wait_procs(stragglers, timeout=5)
    for process in still:
        try:
            process.kill()
        except psutil.Error:
            pass
    _reap(record.pid)
    if _alive([arbiter, *children]):
        raise RuntimeError(f"{record.role} server processes survived stop: {[p.pid for p in still]}")
    if settings is not None and (current := read_record(settings, record.role)) is not None:
        if current.pid == record.pid:
            forget_record(settings, record.role)
    logger.info("stopped %s server pid %s", record.role, record.pid)
