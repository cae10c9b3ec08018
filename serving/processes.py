"""``bentoml serve`` servers, started and stopped by the core supervisor (``medops.core.processes``).

What is BentoML's own lives here: the ``bentoml serve`` command line and its worker count, a
server's record (role, port, Bento, model version, control folder), the startup failure a worker
wrote to the log, readiness on ``/readyz``, and the worker pids whose acknowledgements the rollout
counts. ``bentoml serve`` becomes a circus arbiter whose workers run in sessions of their own; the
supervisor's stop (SIGTERM to the arbiter, then each worker it had, by pid) leaves none running.
"""

from __future__ import annotations

import logging
import re
import socket
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from medops.core import processes as supervisor
from medops.core.processes import child_env, is_running  # the rollout uses both through this module too
from medops.core.settings import Settings
from serving.contract import SERVICE_NAME
from serving.control import CONTROL_ENV

logger = logging.getLogger("medops.serving")


class ServerStartError(RuntimeError):
    """A server did not become ready (it exited, or readiness timed out)."""


@dataclass(kw_only=True)
class ServerRecord(supervisor.ProcessRecord):
    role: str
    port: int
    host: str
    bento: str
    model_version: str
    control_dir: str | None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _name(role: str) -> str:
    return f"serving-{role}"


def record_path(settings: Settings, role: str) -> Path:
    return supervisor.record_path(_name(role), settings)


def write_record(settings: Settings, record: ServerRecord) -> None:
    supervisor.write_record(_name(record.role), record, settings)


def read_record(settings: Settings, role: str) -> ServerRecord | None:
    return supervisor.read_record(_name(role), settings, ServerRecord)


def forget_record(settings: Settings, role: str) -> None:
    supervisor.forget_record(_name(role), settings)


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
    started = supervisor.start_detached(
        command, log=settings.run_dir / f"{_name(role)}.log", env=child_env(settings, extra), cwd=settings.run_dir
    )
    record = ServerRecord(
        **vars(started),
        role=role,
        port=port,
        host=settings.host,
        bento=bento,
        model_version=str(model_version),
        control_dir=str(control_dir) if control_dir else None,
    )
    write_record(settings, record)
    logger.info("started %s server pid %s on port %s (%s)", role, record.pid, port, bento)
    return record


def worker_pids(record: ServerRecord) -> list[int]:
    return [process.pid for process in supervisor.descendants(record)]


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

    with httpx.Client(timeout=2.0) as client:

        def ready() -> bool:
            if not is_running(record):
                raise ServerStartError(f"{record.role} server exited during start; see {record.log}")
            if (failure := startup_failure(record)) is not None:
                raise ServerStartError(f"{record.role} server cannot start: {failure} (see {record.log})")
            try:
                return client.get(f"{record.url}/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        if not supervisor.poll_until(ready, timeout, 0.25):
            raise ServerStartError(f"{record.role} server not ready within {timeout:.0f} s; see {record.log}")


def stop_server(record: ServerRecord, settings: Settings | None = None, timeout: float = 30.0) -> None:
    """SIGTERM the arbiter, wait for it and every process it started; raise if any survives."""
    if not is_running(record):
        if settings is not None:
            forget_record(settings, record.role)
        return
    if survivors := supervisor.stop_process(record, timeout=timeout):
        raise RuntimeError(f"{record.role} server processes survived stop: {survivors}")
    if settings is not None and (current := read_record(settings, record.role)) is not None:
        if current.pid == record.pid:
            forget_record(settings, record.role)
    logger.info("stopped %s server pid %s", record.role, record.pid)
