"""`medops up` / `medops down`: the whole platform on embedded defaults, on loopback.

Airflow's four components (SQLite, LocalExecutor), the MLflow and Evidently UIs and the served
champion; `up` lands the seed through `ingest_data` and waits for a champion to serve. Every door
is locked: loopback only, and Airflow and MLflow ask for passwords medops generated (never printed).
"""

from __future__ import annotations

import configparser
import io
import json
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from medops.core import processes
from medops.core.files import write_atomically
from medops.core.settings import MLFLOW_ADMIN_PASSWORD, REPO_ROOT, Settings

if TYPE_CHECKING:
    from medops.app.airflow_api import AirflowClient

LOOP_DAG_IDS = ["ingest_data", "train_model", "deploy_model"]
DAG_IDS = [*LOOP_DAG_IDS, "monitor_drift"]
# No log server in any component: Airflow's binds 0.0.0.0 (8793/8794) whatever the host setting;
# every component writes task logs where the API server reads them.
AIRFLOW_COMPONENTS = {
    "airflow-api-server": ["api-server"],
    "airflow-scheduler": ["scheduler", "--skip-serve-logs"],
    "airflow-dag-processor": ["dag-processor"],
    "airflow-triggerer": ["triggerer", "--skip-serve-logs"],
}


def airflow_env(settings: Settings) -> dict[str, str]:
    """Airflow configuration for the embedded platform, as environment variables."""
    base = f"http://{settings.host}:{settings.airflow_port}"
    return processes.child_env(
        settings,
        {
            "AIRFLOW_HOME": str(settings.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # up() unpauses them in order: monitor_drift waits until a champion serves.
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(settings.airflow_passwords_file),
            # Tokens the API server signs for task runners: one secret for every component, not one each.
            "AIRFLOW__API_AUTH__JWT_SECRET": settings.secret("airflow_jwt_secret"),
            "AIRFLOW__API__SECRET_KEY": settings.secret("airflow_api_secret_key"),
            "AIRFLOW__API__HOST": settings.host,
            "AIRFLOW__API__PORT": str(settings.airflow_port),
            "AIRFLOW__API__BASE_URL": base,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base}/execution/",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "15",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "600",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW__CORE__LAZY_LOAD_PLUGINS": "True",
            "NO_PROXY": "*",
            # Tasks run side by side on few cores: multi-threaded BLAS only makes them spin (see train.py).
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
        },
    )


def urls(settings: Settings) -> dict[str, str]:
    from serving.processes import connect_host

    h = settings.host
    return {
        "airflow": f"http://{h}:{settings.airflow_port}",
        "mlflow": settings.mlflow_url,
        "serving": f"{'https' if settings.tls_enabled else 'http'}://{connect_host(h)}:{settings.serving_port}",
        "evidently": f"http://{h}:{settings.evidently_port}",
    }


HEALTH_PATHS = {"airflow": "/api/v2/monitor/health", "mlflow": "/health", "serving": "/readyz", "evidently": "/"}


def service_status(settings: Settings) -> dict[str, dict[str, Any]]:
    return {
        name: {"up": processes.http_ok(url + HEALTH_PATHS[name], timeout=1.0), "url": url}
        for name, url in urls(settings).items()
    }


def start_airflow(settings: Settings, env: dict[str, str] | None = None) -> None:
    """Airflow's password file and metadata DB, then its four components, each a process of its own
    (both profiles; ``env`` is the cluster's, by default the embedded one)."""
    from medops.app.airflow_api import write_passwords_file

    env = env or airflow_env(settings)
    write_passwords_file(settings)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    log = settings.run_dir / "airflow-db-migrate.log"
    airflow = str(processes.venv_bin() / "airflow")
    with log.open("ab") as handle:
        migrated = subprocess.run(
            [airflow, "db", "migrate"], env=env, stdout=handle, stderr=subprocess.STDOUT, check=False, timeout=600
        )
    if migrated.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed (exit {migrated.returncode}); see {log}")
    for name, args in AIRFLOW_COMPONENTS.items():
        processes.start(name, [airflow, *args], settings, env=env)


def write_mlflow_auth_config(settings: Settings) -> Path:
    """The basic-auth app's configuration, private: medops' admin, a user database of its own, and
    no permission for any other user until one is granted (runs hold the exact training rows)."""
    login = settings.mlflow_credentials()
    config = configparser.ConfigParser(interpolation=None)
    config["mlflow"] = {
        "default_permission": "NO_PERMISSIONS",
        "database_uri": f"sqlite:///{settings.mlflow_dir / 'basic_auth.db'}",
        "admin_username": login["MLFLOW_TRACKING_USERNAME"],
        "admin_password": login["MLFLOW_TRACKING_PASSWORD"],
    }
    text = io.StringIO()
    config.write(text)
    return write_atomically(settings.mlflow_dir / "basic_auth.ini", text.getvalue(), mode=0o600)


def start_mlflow(settings: Settings, store: list[str] | None = None, hosts: tuple[str, ...] = ()) -> int:
    """MLflow's server on the platform's host. ``store`` are the store arguments; by default the
    embedded SQLite store with its local artifact folder (the cluster profile passes its own).
    ``hosts``: more Host headers to accept (the cluster's train workers call it through a gateway)."""
    settings.artifact_root.mkdir(parents=True, exist_ok=True)
    store = store or ["--backend-store-uri", settings.tracking_uri,
                      "--default-artifact-root", settings.artifact_root.as_uri()]  # fmt: skip
    port = settings.mlflow_port
    # the Host headers a client on this machine sends (against DNS rebinding)
    allowed = ",".join(dict.fromkeys(f"{host}:{port}" for host in (settings.host, "127.0.0.1", "localhost", *hosts)))
    argv = [str(processes.venv_bin() / "mlflow"), "server", *store, "--app-name", "basic-auth",
            "--host", settings.host, "--port", str(port), "--allowed-hosts", allowed, "--workers", "1"]  # fmt: skip
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(write_mlflow_auth_config(settings)),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": settings.secret("mlflow_flask_secret_key"),  # signs CSRF tokens
    }
    return processes.start("mlflow", argv, settings, env=processes.child_env(settings, env, service_keys=False))


def start_evidently(settings: Settings) -> int:
    settings.evidently_workspace.mkdir(parents=True, exist_ok=True)
    argv = [str(processes.venv_bin() / "evidently"), "ui", "--workspace", str(settings.evidently_workspace),
            "--host", settings.host, "--port", str(settings.evidently_port)]  # fmt: skip
    # Writes through the UI's API need the secret (reports are written to the workspace on disk by
    # medops itself). In the environment, not the command line, which other users can read.
    env = processes.child_env(settings, {"EVIDENTLY_SECRET": settings.evidently_secret()}, service_keys=False)
    return processes.start("evidently", argv, settings, env=env)


def airflow_client(settings: Settings) -> AirflowClient:
    from medops.app.airflow_api import AirflowClient, admin_password

    return AirflowClient(urls(settings)["airflow"], password=admin_password(settings))


def wait_for_airflow(settings: Settings, timeout: float = 240) -> None:
    from medops.app.airflow_api import AirflowClient

    alive = lambda: processes.running("airflow-api-server", settings) is not None  # noqa: E731
    with AirflowClient(urls(settings)["airflow"]) as probe:
        processes.wait_until(probe.healthy, timeout, "Airflow API server and scheduler", alive=alive)


def serving_version(settings: Settings) -> str | None:
    """The model version the stable endpoint serves (its X-Model-Version), or None if it is not ready."""
    from serving.client import MedopsClient
    from serving.processes import tls_verify

    url = urls(settings)["serving"]
    with MedopsClient(url, timeout=2.0, connect_retries=0, verify=tls_verify(settings)) as client:
        return client.last_model_version if client.ready() else None


def up(settings: Settings, *, wait: bool = True, console: Console, out: Console, timeout: float = 900) -> None:
    """Start everything, land the seed through ingest_data and wait for a champion to serve."""
    from pipelines import data_registry, model_registry

    started = time.monotonic()
    os.environ[processes.PLATFORM_MARKER] = str(settings.home)  # inherited by all we start, see down()
    for folder in (settings.landing_dir, settings.quarantine_dir, settings.reports_dir, settings.run_dir):
        folder.mkdir(parents=True, exist_ok=True)
    if settings.profile == "cluster":
        from medops.app import cluster

        with console.status(
            "[cyan]PostgreSQL databases, the DVC remote (WebDAV), the registry's git server, MLflow's tracking server…"
        ):
            cluster.start_services(settings)
    with console.status("[cyan]MLflow store and data registry…"):
        model_registry.ensure_experiment(settings)
        fresh = data_registry.latest_version(settings) is None
        settings.service_api_keys()  # generated now, before anything that serves or calls the service starts
    if settings.profile == "cluster":
        with console.status(
            f"[cyan]starting Airflow (4 components, {settings.cluster_workers} train workers + the host's worker) "
            "and Evidently UI…"
        ):
            start_evidently(settings)
            cluster.start_airflow(settings)
            wait_for_airflow(settings)
        console.print(
            f"[green]✓[/] cluster profile: Airflow on PostgreSQL with {settings.cluster_workers} train workers "
            "(homes of their own) and the host's worker, MLflow on PostgreSQL, DVC remote over WebDAV, "
            "the data registry over git, Evidently"
        )
        console.print(f"[green]✓[/] train workers: {cluster.isolation(settings)}")
    else:
        with console.status("[cyan]starting MLflow UI, Evidently UI and Airflow (4 components)…"):
            start_mlflow(settings)
            start_evidently(settings)
            start_airflow(settings)
            wait_for_airflow(settings)
        console.print("[green]✓[/] Airflow, MLflow and Evidently are up")
    client = airflow_client(settings)
    with console.status("[cyan]waiting for the DAG processor to parse the DAGs…"):
        client.wait_for_dags(DAG_IDS)
        for dag_id in LOOP_DAG_IDS:
            client.unpause(dag_id)
    console.print("[green]✓[/] DAGs parsed and unpaused: " + ", ".join(LOOP_DAG_IDS))

    if (champion := model_registry.champion_version(settings)) is None:
        run_id = client.trigger("ingest_data", {"announce_latest": True})
        console.print(
            f"[green]✓[/] triggered ingest_data ({run_id})" + (": the seed lands as data-v1" if fresh else "")
        )
    elif serving_version(settings) != champion:
        from serving import rollout

        with console.status(f"[cyan]starting the champion v{champion} on the serving port…"):
            rollout.serve(settings, champion)
    if wait:
        with console.status("[cyan]ingest_data → train_model → deploy_model: waiting for a champion to serve…"):
            processes.wait_until(
                lambda: (v := model_registry.champion_version(settings)) is not None and serving_version(settings) == v,
                timeout,
                "a champion serving on the serving port",
                poll=2.0,
            )
        console.print(
            f"[green]✓[/] champion v{model_registry.champion_version(settings)} serving "
            f"({time.monotonic() - started:.0f}s)"
        )
    # Hourly drift monitoring starts once there is a champion to monitor (its first run is immediate).
    client.unpause("monitor_drift")
    client.close()
    print_summary(settings, out)


def print_summary(settings: Settings, out: Console) -> None:
    """URLs and where each credential is read (never the credential: a terminal gets scrolled back,
    recorded, shared)."""
    from medops.app.airflow_api import ADMIN_PASSWORD

    u = urls(settings)
    example = '{"records": [' + _example_record() + "]}"
    secrets = settings.secrets_dir
    key = "${MEDOPS_API_KEYS%%,*}" if settings.api_keys else f"$(cat {secrets / 'api_key'})"
    out.print(
        f"""
[bold]medops is up[/] (MEDOPS_HOME={settings.home})

  Profile     {settings.profile}
  Airflow     {u["airflow"]}    user [bold]admin[/], password in {secrets / ADMIN_PASSWORD}
  MLflow      {u["mlflow"]}    user [bold]admin[/], password in {secrets / MLFLOW_ADMIN_PASSWORD}
  Evidently   {u["evidently"]}
  Service     {u["serving"]}    API key {"in MEDOPS_API_KEYS" if settings.api_keys else f"in {secrets / 'api_key'}"}
  (each file is readable by you only)

Predict:
  curl -s -H "Authorization: Bearer {key}" -H 'Content-Type: application/json' \\
       -d '{example}' {u["serving"]}/predict

Drift scenario (drifted traffic → monitor → alert → retrain → new champion serving):
  .venv/bin/medops drift-scenario --site site-d --records 400 --drift covariate

Stop everything: make stop
""",
        highlight=False,
        soft_wrap=True,
    )
    out.print(alert_channels_line(settings), highlight=False, soft_wrap=True)


def alert_channels_line(settings: Settings) -> str:
    """Where alerts go, or how to make them reach someone: a drift alert must never vanish."""
    from medops.core.alerts import configured_channels

    if channels := configured_channels(settings):
        return f"Alerts go to: {', '.join(channels)} (undelivered ones wait in `medops alerts`)."
    return (
        "No alert channel is set: alerts wait in MEDOPS_HOME/alerts/outbox/ (list them with `medops alerts`).\n"
        "To reach on-call people, set MEDOPS_ALERT_WEBHOOK_URL (Slack-shaped webhook), or MEDOPS_SMTP_HOST,\n"
        "MEDOPS_SMTP_PORT and MEDOPS_ALERT_EMAIL_TO, then `make stop` and `make run` again."
    )


def _example_record() -> str:
    from pipelines.data import seed_frame
    from pipelines.schema import FEATURES

    row = seed_frame().iloc[0]
    record = {name: float(row[name]) for name in FEATURES} | {"encounter_id": "enc-0001"}
    return json.dumps(record, separators=(",", ":"))


def down(settings: Settings, *, console: Console) -> None:
    """Stop the served Bentos, Airflow, MLflow and Evidently that `up` started."""
    from medops.app import cluster
    from serving import rollout

    rollout.stop_all(settings)
    console.print("[green]✓[/] serving stopped")
    # Every process either profile starts: `down` with the other profile set still stops everything.
    stopped = cluster.stop(settings)
    for name in stopped:
        console.print(f"[green]✓[/] {name} stopped")
    if not stopped:
        console.print("[dim]no platform process was running[/]")
    if left := processes.stop_strays(settings):
        console.print(f"[green]✓[/] stopped {len(left)} process(es) left behind by the above")
