"""``bentoml serve`` servers, started and stopped by the core supervisor (``medops.core.processes``).

What is BentoML's own lives here: the ``bentoml serve`` command line, a server's record, the startup
failure a worker logged, readiness on ``/readyz`` and the worker pids whose acknowledgements the rollout
counts. ``bentoml serve`` is a circus arbiter whose workers run in sessions of their own; the supervisor's
stop (SIGTERM to the arbiter, then each worker it had, by pid) leaves none running.
"""

from __future__ import annotations

import logging
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medops.core import processes as supervisor
from medops.core.processes import child_env, is_running  # the rollout uses both through this module too
from medops.core.settings import Settings
from serving.contract import SERVICE_NAME
from serving.control import CONTROL_ENV

logger = logging.getLogger("medops.serving")


class ServerStartError(RuntimeError):
    """A server did not become ready (it exited, or readiness timed out)."""


class ExposureRefused(ServerStartError):
    """``MEDOPS_HOST`` would let other machines reach a service that has no TLS or no configured keys."""


@dataclass(kw_only=True)
class ServerRecord(supervisor.ProcessRecord):
    role: str
    port: int
    host: str
    bento: str
    model_version: str
    control_dir: str | None
    scheme: str = "http"
    ca_file: str | None = None  # what medops' own clients verify the server's certificate against

    @property
    def url(self) -> str:
        return f"{self.scheme}://{connect_host(self.host)}:{self.port}"


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def connect_host(host: str) -> str:
    """Where medops' own clients reach a server listening on ``host`` (loopback for a wildcard)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104


def check_exposure(settings: Settings) -> None:
    """Refuse to serve beyond loopback unless TLS and authentication are both configured: keys someone
    chose (``MEDOPS_API_KEYS`` or ``medops keys create``), not the first-run or rollout key nobody handed out."""
    from serving.keys import has_deliberate_keys

    if is_loopback(settings.host):
        return
    missing = []
    if not settings.tls_enabled:
        missing.append("TLS (MEDOPS_TLS_CERTFILE and MEDOPS_TLS_KEYFILE)")
    if not has_deliberate_keys(settings):
        missing.append("authentication (MEDOPS_API_KEYS, or a key made with `medops keys create`)")
    if missing:
        raise ExposureRefused(
            f"MEDOPS_HOST={settings.host} would let other machines reach the service without "
            f"{' and '.join(missing)}; configure them, or leave MEDOPS_HOST at 127.0.0.1"
        )


def tls_arguments(settings: Settings) -> list[str]:
    """``bentoml serve``'s TLS options (uvicorn's ssl settings) from MEDOPS_TLS_CERTFILE/KEYFILE."""
    given = {"MEDOPS_TLS_CERTFILE": settings.tls_certfile, "MEDOPS_TLS_KEYFILE": settings.tls_keyfile}
    if not any(given.values()):
        return []
    for name, path in given.items():
        if path is None:
            raise ServerStartError(f"{name} is not set: TLS needs both MEDOPS_TLS_CERTFILE and MEDOPS_TLS_KEYFILE")
        if not Path(path).is_file():
            raise ServerStartError(f"{name}={path} is not a file")
    return ["--ssl-certfile", str(settings.tls_certfile), "--ssl-keyfile", str(settings.tls_keyfile)]


def tls_verify(settings: Settings) -> Any:
    """What medops' own clients (readiness, smoke tests, status) verify the service's certificate with."""
    if not settings.tls_enabled:
        return True
    import ssl

    return ssl.create_default_context(cafile=str(settings.tls_ca_file or settings.tls_certfile))


def _name(role: str) -> str:
    return f"serving-{role}"


def write_record(settings: Settings, record: ServerRecord) -> None:
    supervisor.write_record(_name(record.role), record, settings)


def read_record(settings: Settings, role: str) -> ServerRecord | None:
    return supervisor.read_record(_name(role), settings, ServerRecord)


def forget_record(settings: Settings, role: str) -> None:
    supervisor.forget_record(_name(role), settings)


def find_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
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
    """Start ``bentoml serve <bento>`` on ``settings.host``:``port`` in its own session; returns at once.
    Refused unless :func:`check_exposure` allows it; with TLS configured the server speaks HTTPS only."""
    check_exposure(settings)
    tls = tls_arguments(settings)
    extra = {
        "BENTOML_CONFIG_OPTIONS": f"services.{SERVICE_NAME}.workers={workers or settings.serving_workers}",
        "MEDOPS_SERVING_BENTO": bento,
    }
    if control_dir is not None:
        control_dir.mkdir(parents=True, exist_ok=True)
        extra[CONTROL_ENV] = str(control_dir)
    command = [
        sys.executable, "-m", "bentoml", "serve", bento, "--host", settings.host, "--port", str(port), *tls,
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
        scheme="https" if tls else "http",
        ca_file=str(settings.tls_ca_file or settings.tls_certfile) if tls else None,
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
    import ssl

    import httpx

    verify = ssl.create_default_context(cafile=record.ca_file) if record.ca_file else True
    with httpx.Client(timeout=2.0, verify=verify) as client:

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
