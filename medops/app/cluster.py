"""The cluster profile (`medops up --profile cluster`): the same loop on real engines.

Airflow on PostgreSQL with the CeleryExecutor (Redis as broker), ``MEDOPS_CLUSTER_WORKERS`` Celery
train workers that stand for other hosts, and the scheduler host's own worker. A train worker has
an empty ``MEDOPS_HOME`` of its own (``hosts/<name>``): it reads data versions from the registry's
read-only git daemon and the DVC remote (WebDAV), gets MLflow's login from its environment, and
hands models on through MLflow's tracking server (PostgreSQL, proxied artifacts) only. PostgreSQL
and Redis are the machine's; medops creates its role and databases there if they are missing.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from medops.app import netns, platform
from medops.core import processes
from medops.core.settings import Settings

DATABASES = ("airflow", "mlflow")
TRAIN_QUEUE = "train"
DEFAULT_QUEUE = "default"
CLUSTER_DB_ROLE = "medops"
HOST_WORKER = "airflow-worker-host"
HOSTS = "hosts"  # under the scheduler's MEDOPS_HOME: one folder per train worker, standing for its own disk
REGISTRY_SERVER = "registry-git"
# what a train worker does not get: the service's keys, the Airflow UI's password file
WORKER_DROPS = frozenset({"MEDOPS_API_KEYS", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"})


def cluster_db_url(settings: Settings, purpose: str, driver: str = "postgresql+psycopg2") -> str:
    """The cluster's own database for ``purpose`` (``airflow``, ``mlflow``), as the ``medops`` role."""
    from sqlalchemy.engine import make_url

    admin = make_url(settings.postgres_url)
    url = admin.set(drivername=driver, username=CLUSTER_DB_ROLE, password=None)
    return url.set(database=f"{settings.cluster_db_prefix}_{purpose}").render_as_string(hide_password=False)


def worker_name(index: int) -> str:
    return f"airflow-worker-{index}"


def process_names(settings: Settings, workers: int | None = None) -> list[str]:
    """Every process either profile starts (workers, WebDAV and the registry's git daemon: the
    cluster's only), in the order `down` stops them (workers first)."""
    count = settings.cluster_workers if workers is None else workers
    workers_first = [*map(worker_name, range(1, count + 1)), HOST_WORKER]
    gateways = [gateway_name(index) for index in range(1, count + 1)]
    services = [*platform.AIRFLOW_COMPONENTS, "mlflow", REGISTRY_SERVER, "webdav", "evidently"]
    return [*workers_first, *gateways, *services]


def gateway_name(index: int) -> str:
    """The forwarder a train worker in a network namespace reaches the services through."""
    return f"gateway-{index}"


def worker_home(settings: Settings, name: str) -> Path:
    """A train worker's MEDOPS_HOME: another host's disk, sharing no file with the scheduler's home."""
    return settings.home / HOSTS / name


def registry_git_url(settings: Settings) -> str:
    """The data registry's git remote, read-only (``git daemon``): what a train worker clones."""
    return f"git://{settings.host}:{settings.registry_port}/{settings.registry_dir.name}"


# Databases ------------------------------------------------------------------------------------------
def _admin_connection(settings: Settings) -> contextlib.closing:
    import psycopg2

    connection = psycopg2.connect(settings.postgres_url)
    # CREATE DATABASE refuses to run inside a transaction, and psycopg2's `with connection` opens one
    connection.autocommit = True
    return contextlib.closing(connection)


def database_names(settings: Settings) -> list[str]:
    return [f"{settings.cluster_db_prefix}_{purpose}" for purpose in DATABASES]


def ensure_databases(settings: Settings) -> list[str]:
    """Create the ``medops`` role and the profile's databases that are missing; returns those created."""
    from psycopg2 import sql

    created = []
    with _admin_connection(settings) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (CLUSTER_DB_ROLE,))
        if cursor.fetchone() is None:
            cursor.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(CLUSTER_DB_ROLE)))
        for name in database_names(settings):
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone() is None:
                cursor.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(CLUSTER_DB_ROLE))
                )
                created.append(name)
    return created


def existing_databases(settings: Settings) -> list[str]:
    with _admin_connection(settings) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (database_names(settings),))
        return sorted(row[0] for row in cursor.fetchall())


def drop_databases(settings: Settings) -> None:
    """Drop the profile's databases (tests use a prefix of their own and leave nothing behind)."""
    from psycopg2 import sql

    with _admin_connection(settings) as connection, connection.cursor() as cursor:
        for name in database_names(settings):
            cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# Airflow --------------------------------------------------------------------------------------------
def airflow_env(settings: Settings) -> dict[str, str]:
    """The standalone configuration with PostgreSQL and Celery."""
    database = cluster_db_url(settings, "airflow")
    return platform.airflow_env(settings) | {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database,
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": settings.redis_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + database,
        # two cores for all workers: more task processes per worker only queue on the CPU
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": DEFAULT_QUEUE,
        "AIRFLOW__CORE__PARALLELISM": str(max(4, 2 * (settings.cluster_workers + 1))),  # + the host's worker
    }


def start_airflow(settings: Settings) -> None:
    """The four components as in the standalone profile, on PostgreSQL, then the workers."""
    env = airflow_env(settings)
    platform.start_airflow(settings, env)
    start_workers(settings, env)


def worker_argv(name: str, queues: list[str]) -> list[str]:
    return [str(processes.venv_bin() / "airflow"), "celery", "worker", "--queues", ",".join(queues),
            "--celery-hostname", f"{name}@%h", "--skip-serve-logs", "--without-gossip", "--without-mingle"]  # fmt: skip


def train_worker_env(settings: Settings, env: dict[str, str], name: str) -> dict[str, str]:
    """A train worker as another host: a ``MEDOPS_HOME`` of its own, the data registry read over git,
    MLflow's login given here (``MEDOPS_SECRETS_FROM_ENV``), no service key. Only the process marker
    ``down`` looks for and Airflow's log folder (where the API server reads task logs) still name the
    scheduler's home."""
    home = worker_home(settings, name)
    worker = {key: value for key, value in env.items() if key not in WORKER_DROPS}
    return worker | {
        "MEDOPS_HOME": str(home),
        "MEDOPS_WORKER_NAME": name,
        "MEDOPS_REGISTRY_URL": registry_git_url(settings),
        "MEDOPS_SECRETS_FROM_ENV": "true",
        **settings.mlflow_credentials(),
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(settings.airflow_home / "logs"),
        "BENTOML_HOME": str(home / "bentoml"),
    }


def start_workers(settings: Settings, env: dict[str, str]) -> list[int]:
    """The train workers (``train`` and a queue of their own), each on an empty home of its own, and
    the scheduler host's own worker (``default``), on the scheduler's home."""
    pids = []
    isolated = netns.enabled(settings)
    for index in range(1, settings.cluster_workers + 1):
        name = worker_name(index)
        if (current := processes.running(name, settings)) is not None:
            pids.append(current.pid)  # already up (and in its namespace, if it has one)
            continue
        home = worker_home(settings, name)  # a new host's disk: empty
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True, mode=0o700)
        argv, worker_env = worker_argv(name, [TRAIN_QUEUE, name]), train_worker_env(settings, env, name)
        if isolated:
            argv, worker_env = _isolate(settings, index, argv, worker_env)
        pids.append(processes.start(name, argv, settings, env=worker_env))
    argv = worker_argv(HOST_WORKER, [DEFAULT_QUEUE, HOST_WORKER])
    pids.append(processes.start(HOST_WORKER, argv, settings, env=env | {"MEDOPS_WORKER_NAME": HOST_WORKER}))
    return pids


def _isolate(settings: Settings, index: int, argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Train worker ``index`` in a network namespace of its own, its gateway started: the argv
    (``ip netns exec`` execs the worker, which keeps the pid) and the environment naming the gateway."""
    processes.stop(gateway_name(index), settings)
    link = netns.create(settings, index)
    gateway_argv = [sys.executable, "-m", "medops.app.gateway", link.gateway, *map(str, netns.ports(settings))]
    processes.start(gateway_name(index), gateway_argv, settings, env=processes.child_env(settings))
    reachable = partial(_reachable, link.gateway, settings.airflow_port)
    _wait_for(settings, gateway_name(index), reachable, 30, f"the gateway of {worker_name(index)}")
    return [shutil.which("ip") or "ip", "netns", "exec", link.namespace, *argv], netns.rewrite_env(env, link.gateway)


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


# MLflow and the DVC remote --------------------------------------------------------------------------
def start_mlflow(settings: Settings) -> int:
    """The tracking server on PostgreSQL; artifacts go through it (``mlflow-artifacts:/``) to a folder."""
    store = ["--backend-store-uri", cluster_db_url(settings, "mlflow"), "--artifacts-destination",
             str(settings.artifact_root), "--serve-artifacts"]  # fmt: skip
    # a train worker in a network namespace calls it by its gateway's address (10.231.*)
    return platform.start_mlflow(settings, store, (netns.HOST_PATTERN,) if netns.enabled(settings) else ())


def start_webdav(settings: Settings) -> int:
    """The DVC remote's folder over WebDAV (anonymous, on the profile's host address only)."""
    settings.dvc_remote_dir.mkdir(parents=True, exist_ok=True)
    argv = [str(processes.venv_bin() / "wsgidav"), "--host", settings.host, "--port", str(settings.webdav_port),
            "--root", str(settings.dvc_remote_dir), "--auth", "anonymous", "--server", "cheroot",
            "--no-config", "-q"]  # fmt: skip
    return processes.start("webdav", argv, settings)


def start_registry_server(settings: Settings) -> int:
    """The data registry's git repository, read-only over git's own protocol (``git daemon``: no
    push), on the profile's host address; only the registry is exported. Train workers clone it."""
    settings.registry_dir.mkdir(parents=True, exist_ok=True)
    argv = ["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={settings.home}", f"--listen={settings.host}",
            f"--port={settings.registry_port}", str(settings.registry_dir)]  # fmt: skip
    return processes.start(REGISTRY_SERVER, argv, settings)


def start_services(settings: Settings) -> None:
    """Databases, the WebDAV remote, the registry's git server and MLflow, waited for: the pipeline
    needs them before Airflow."""
    ensure_databases(settings)
    start_webdav(settings)
    start_registry_server(settings)
    start_mlflow(settings)
    webdav_url, mlflow_health = f"http://{settings.host}:{settings.webdav_port}/", f"{settings.mlflow_url}/health"
    git_daemon = partial(_reachable, settings.host, settings.registry_port)
    _wait_for(settings, REGISTRY_SERVER, git_daemon, 60, "the git daemon of the data registry")
    _wait_for(settings, "webdav", lambda: processes.http_ok(webdav_url), 60, "the WebDAV server of the DVC remote")
    _wait_for(settings, "mlflow", lambda: processes.http_ok(mlflow_health), 180, "the MLflow tracking server")


def _wait_for(settings: Settings, name: str, check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for ``check``; give up at once if the platform process ``name`` exited."""
    processes.wait_until(check, timeout, what, alive=lambda: processes.running(name, settings) is not None)


def isolation(settings: Settings) -> str:
    """What `up` says about the train workers' network."""
    if netns.enabled(settings):
        return "each in a network namespace of its own, reaching the services through a gateway"
    return "plain processes on this machine's network (MEDOPS_CLUSTER_NETNS=off, or not root / no `ip`)"


def stop(settings: Settings) -> list[str]:
    """Stop every cluster process that runs; returns the names stopped."""
    names = process_names(settings, workers=_started_workers(settings))
    stopped = [name for name in names if processes.stop(name, settings)]
    return stopped + [f"network namespace {name}" for name in netns.delete_all(settings)]


def _started_workers(settings: Settings) -> int:
    """Workers recorded in ``run/``: `down` may run with another ``MEDOPS_CLUSTER_WORKERS`` than `up`."""
    found = [p.stem for p in settings.run_dir.glob("airflow-worker-*.json")]
    numbers = [int(name.rsplit("-", 1)[1]) for name in found if name.rsplit("-", 1)[1].isdigit()]
    return max([settings.cluster_workers, *numbers])
