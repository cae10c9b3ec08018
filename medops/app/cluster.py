"""The cluster profile (`medops up --profile cluster`): the same loop on real engines.

Airflow on PostgreSQL with the CeleryExecutor (Redis as broker, the Airflow database as Celery's
result backend), its API server, scheduler, DAG processor and triggerer as separate processes (as in
the standalone profile: :func:`medops.app.platform.start_airflow`), and
``MEDOPS_CLUSTER_WORKERS`` Celery workers, each consuming ``default``, ``train`` and a queue of its
own. MLflow's tracking server on PostgreSQL with proxied artifacts, so a client needs only its URL.
The DVC remote is a WebDAV server (wsgidav), reached over HTTP by every host.

Every process goes through :mod:`medops.core.processes`; PostgreSQL and Redis are the machine's
(``MEDOPS_POSTGRES_URL``, ``MEDOPS_REDIS_URL``). medops creates its role and databases there if
they are missing and reuses them otherwise; `medops down` stops what `up` started.
"""

from __future__ import annotations

import contextlib

from medops.app import platform
from medops.core import processes
from medops.core.settings import Settings

DATABASES = ("airflow", "mlflow")
TRAIN_QUEUE = "train"
DEFAULT_QUEUE = "default"


CLUSTER_DB_ROLE = "medops"


def cluster_db_url(settings: Settings, purpose: str, driver: str = "postgresql+psycopg2") -> str:
    """The cluster's own database for ``purpose`` (``airflow``, ``mlflow``), as the ``medops`` role."""
    from sqlalchemy.engine import make_url

    admin = make_url(settings.postgres_url)
    url = admin.set(drivername=driver, username=CLUSTER_DB_ROLE, password=None)
    return url.set(database=f"{settings.cluster_db_prefix}_{purpose}").render_as_string(hide_password=False)


def worker_name(index: int) -> str:
    return f"airflow-worker-{index}"


def process_names(settings: Settings, workers: int | None = None) -> list[str]:
    """Every process either profile starts (workers and WebDAV: the cluster's only), in the order
    `down` stops them (workers first)."""
    count = settings.cluster_workers if workers is None else workers
    return [*map(worker_name, range(1, count + 1)), *platform.AIRFLOW_COMPONENTS, "mlflow", "webdav", "evidently"]


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
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + cluster_db_url(settings, "airflow"),
        # two cores for all workers: more task processes per worker only queue on the CPU
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": DEFAULT_QUEUE,
        "AIRFLOW__CORE__PARALLELISM": str(max(4, 2 * settings.cluster_workers)),
    }


def start_airflow(settings: Settings) -> None:
    """The four components as in the standalone profile, on PostgreSQL, then the workers."""
    env = airflow_env(settings)
    platform.start_airflow(settings, env)
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
    store = ["--backend-store-uri", cluster_db_url(settings, "mlflow"), "--artifacts-destination",
             str(settings.artifact_root), "--serve-artifacts"]  # fmt: skip
    return platform.start_mlflow(settings, store)


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
    processes.wait_until(
        lambda: processes.http_ok(f"http://{settings.host}:{settings.webdav_port}/"),
        60,
        "the WebDAV server of the DVC remote",
        alive=lambda: processes.running("webdav", settings) is not None,
    )
    processes.wait_until(
        lambda: processes.http_ok(f"{settings.mlflow_url}/health"),
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
