"""The cluster profile (`medops up --profile cluster`): the same loop on real engines.

Airflow on PostgreSQL with the CeleryExecutor (Redis as broker, the Airflow database as Celery's
result backend), its API server, scheduler, DAG processor and triggerer as separate processes, and
``MEDOPS_CLUSTER_WORKERS`` Celery workers, each consuming ``default``, ``train`` and a queue of its
own. MLflow's tracking server on PostgreSQL with proxied artifacts, so a client needs only its URL.
The DVC remote is a WebDAV server (wsgidav), reached over HTTP by every host.

Every process goes through :mod:`medops.core.processes`; PostgreSQL and Redis are the machine's
(``MEDOPS_POSTGRES_URL``, ``MEDOPS_REDIS_URL``). medops creates its role and databases there if
they are missing and reuses them otherwise; `medops down` stops what `up` started.
"""

from __future__ import annotations

import contextlib
import subprocess

from medops.core import processes
from medops.core.settings import CLUSTER_DB_ROLE, Settings

AIRFLOW_COMPONENTS = ["airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"]
DATABASES = ("airflow", "mlflow")
TRAIN_QUEUE = "train"
DEFAULT_QUEUE = "default"


def worker_name(index: int) -> str:
    return f"airflow-worker-{index}"


def process_names(settings: Settings, workers: int | None = None) -> list[str]:
    """Every process the cluster profile starts, in the order `down` stops them (workers first)."""
    count = settings.cluster_workers if workers is None else workers
    return [*(worker_name(i) for i in range(1, count + 1)), *AIRFLOW_COMPONENTS, "mlflow", "webdav", "evidently"]


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
    """The standalone configuration with PostgreSQL, Celery and secrets every component shares."""
    from medops.app.platform import airflow_env as standalone_env

    database = settings.cluster_db_url("airflow")
    return standalone_env(settings) | {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database,
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": settings.redis_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + settings.cluster_db_url("airflow"),
        # two cores for all workers: more task processes per worker only queue on the CPU
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": DEFAULT_QUEUE,
        # Tokens the API server signs for task runners on any host: one secret, not one per process.
        "AIRFLOW__API_AUTH__JWT_SECRET": settings.secret("airflow_jwt_secret"),
        "AIRFLOW__API__SECRET_KEY": settings.secret("airflow_api_secret_key"),
        "AIRFLOW__CORE__PARALLELISM": str(max(4, 2 * settings.cluster_workers)),
    }


def migrate_airflow_db(settings: Settings, env: dict[str, str]) -> None:
    log = settings.run_dir / "airflow-db-migrate.log"
    with log.open("ab") as handle:
        result = subprocess.run(
            [str(processes.venv_bin() / "airflow"), "db", "migrate"],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=600,
        )
    if result.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed (exit {result.returncode}); see {log}")


def start_airflow(settings: Settings) -> None:
    """Migrate the metadata DB, then the four components, then the workers, each its own process."""
    settings.airflow_home.mkdir(parents=True, exist_ok=True)
    env = airflow_env(settings)
    migrate_airflow_db(settings, env)
    airflow = str(processes.venv_bin() / "airflow")
    # No log server anywhere: every process here writes task logs where the API server reads them.
    commands = {
        "airflow-api-server": [airflow, "api-server"],
        "airflow-scheduler": [airflow, "scheduler", "--skip-serve-logs"],
        "airflow-dag-processor": [airflow, "dag-processor"],
        "airflow-triggerer": [airflow, "triggerer", "--skip-serve-logs"],
    }
    for name, argv in commands.items():
        processes.start(name, argv, settings, env=env)
    start_workers(settings, env)


def start_workers(settings: Settings, env: dict[str, str]) -> list[int]:
    airflow = str(processes.venv_bin() / "airflow")
    pids = []
    for index in range(1, settings.cluster_workers + 1):
        name = worker_name(index)
        argv = [
            airflow,
            "celery",
            "worker",
            "--queues",
            ",".join([DEFAULT_QUEUE, TRAIN_QUEUE, name]),
            "--celery-hostname",
            f"{name}@%h",
            "--skip-serve-logs",
            "--without-gossip",
            "--without-mingle",
        ]
        pids.append(processes.start(name, argv, settings, env=env | {"MEDOPS_WORKER_NAME": name}))
    return pids


# MLflow and the DVC remote --------------------------------------------------------------------------
def start_mlflow(settings: Settings) -> int:
    """The tracking server on PostgreSQL; artifacts go through it (``mlflow-artifacts:/``) to a folder."""
    settings.artifact_root.mkdir(parents=True, exist_ok=True)
    argv = [
        str(processes.venv_bin() / "mlflow"),
        "server",
        "--backend-store-uri",
        settings.cluster_db_url("mlflow"),
        "--artifacts-destination",
        str(settings.artifact_root),
        "--serve-artifacts",
        "--host",
        settings.host,
        "--port",
        str(settings.mlflow_port),
        "--workers",
        "1",
    ]
    return processes.start("mlflow", argv, settings)


def start_webdav(settings: Settings) -> int:
    """The DVC remote's folder over WebDAV (anonymous, on the profile's host address only)."""
    settings.dvc_remote_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(processes.venv_bin() / "wsgidav"),
        "--host",
        settings.host,
        "--port",
        str(settings.webdav_port),
        "--root",
        str(settings.dvc_remote_dir),
        "--auth",
        "anonymous",
        "--server",
        "cheroot",
        "--no-config",
        "-q",
    ]
    return processes.start("webdav", argv, settings)


def start_services(settings: Settings) -> None:
    """Databases, the WebDAV remote and MLflow, waited for: the pipeline needs both before Airflow."""
    ensure_databases(settings)
    start_webdav(settings)
    start_mlflow(settings)
    base = f"http://{settings.host}"
    processes.wait_until(
        lambda: processes.http_ok(f"{base}:{settings.webdav_port}/"),
        60,
        "the WebDAV server of the DVC remote",
        alive=lambda: processes.running("webdav", settings) is not None,
    )
    processes.wait_until(
        lambda: processes.http_ok(f"{base}:{settings.mlflow_port}/health"),
        180,
        "the MLflow tracking server",
        alive=lambda: processes.running("mlflow", settings) is not None,
    )


def stop(settings: Settings) -> list[str]:
    """Stop every cluster process that runs; returns the names stopped."""
    names = process_names(settings, workers=_started_workers(settings))
    return [name for name in names if processes.stop(name, settings)]


def _started_workers(settings: Settings) -> int:
    """Workers recorded in ``run/``: `down` may run with another ``MEDOPS_CLUSTER_WORKERS`` than `up`."""
    found = [p.stem for p in settings.run_dir.glob("airflow-worker-*.json")]
    numbers = [int(name.rsplit("-", 1)[1]) for name in found if name.rsplit("-", 1)[1].isdigit()]
    return max([settings.cluster_workers, *numbers])
