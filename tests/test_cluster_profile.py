"""The cluster profile's configuration, and its databases on the machine's PostgreSQL."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from medops.app import cluster
from medops.core.settings import Settings


def test_cluster_clients_reach_servers_not_files(tmp_path: Path):
    settings = Settings(home=tmp_path, profile="cluster", mlflow_port=5111, webdav_port=8111)
    assert settings.tracking_uri == "http://127.0.0.1:5111"
    assert settings.dvc_remote_url == "webdav://127.0.0.1:8111/"
    assert cluster.cluster_db_url(settings, "mlflow") == "postgresql+psycopg2://medops@127.0.0.1:5432/medops_mlflow"
    standalone = Settings(home=tmp_path)
    assert standalone.tracking_uri.startswith("sqlite:///") and "://" not in standalone.dvc_remote_url


def test_explicit_stores_win_over_the_profile(tmp_path: Path):
    settings = Settings(
        home=tmp_path, profile="cluster", dvc_remote="s3://bucket/dvc", mlflow_tracking_uri="https://mlflow.example"
    )
    assert settings.dvc_remote_url == "s3://bucket/dvc"
    assert settings.tracking_uri == "https://mlflow.example"


def test_an_unknown_profile_is_refused_by_name(tmp_path: Path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="profile"):
        Settings(home=tmp_path, profile="kubernetes")


def test_airflow_components_share_the_database_broker_and_token_secret(tmp_path: Path):
    settings = Settings(home=tmp_path, profile="cluster", cluster_db_prefix="medops_cfg", cluster_workers=3)
    env, again = cluster.airflow_env(settings), cluster.airflow_env(settings)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("/medops_cfg_airflow")
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+" + env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__CELERY__BROKER_URL"] == settings.redis_url
    assert env["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] == "default"
    # a task runner's token, signed by the API server, must verify in every other process
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == again["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert len(env["AIRFLOW__API_AUTH__JWT_SECRET"]) >= 32
    assert cluster.process_names(settings)[:4] == [
        "airflow-worker-1",
        "airflow-worker-2",
        "airflow-worker-3",
        "airflow-worker-host",
    ]
    assert {"registry-git", "webdav", "mlflow"} <= set(cluster.process_names(settings))


def test_a_train_worker_is_another_host_given_its_logins_by_configuration(tmp_path: Path, monkeypatch):
    """Its own MEDOPS_HOME (nothing else under the scheduler's but the log folder and down's marker),
    the registry over git, MLflow's login in its environment, no service key, no secrets folder."""
    from medops.core import processes

    settings = Settings(home=tmp_path / "scheduler", profile="cluster", registry_port=9555, api_keys="k")
    env = cluster.train_worker_env(settings, cluster.airflow_env(settings), "airflow-worker-2")
    home = settings.home / "hosts" / "airflow-worker-2"
    assert env["MEDOPS_HOME"] == str(home) and env["MEDOPS_WORKER_NAME"] == "airflow-worker-2"
    assert env["MEDOPS_REGISTRY_URL"] == "git://127.0.0.1:9555/registry"
    assert env["AIRFLOW_HOME"] == str(home / "airflow")
    assert {
        k: env[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    } == settings.mlflow_credentials()
    assert "MEDOPS_API_KEYS" not in env
    scheduler_paths = {
        key
        for key, value in env.items()
        if str(settings.home) in value and str(home) not in value and not value.startswith("git://")
    }
    assert scheduler_paths == {processes.PLATFORM_MARKER, "AIRFLOW__LOGGING__BASE_LOG_FOLDER"}, scheduler_paths

    for key in [k for k in os.environ if k.startswith("MEDOPS_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("MEDOPS_", "MLFLOW_TRACKING_")):
            monkeypatch.setenv(key, value)
    worker = Settings()
    assert worker.home == home and worker.secrets_from_env and worker.registry_url == env["MEDOPS_REGISTRY_URL"]
    assert worker.mlflow_credentials() == settings.mlflow_credentials()
    with pytest.raises(RuntimeError, match="not given to this host"):
        worker.secret("airflow_jwt_secret")
    assert not (home / "secrets").exists()
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(RuntimeError, match="MLFLOW_TRACKING_PASSWORD"):
        worker.mlflow_credentials()


def _postgres_reachable() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.mark.integration
def test_databases_are_created_once_then_reused(tmp_path: Path):
    assert _postgres_reachable(), "PostgreSQL on 127.0.0.1:5432 is part of this machine's services"
    settings = Settings(home=tmp_path, profile="cluster", cluster_db_prefix=f"medops_db_{os.getpid()}")
    try:
        assert cluster.ensure_databases(settings) == cluster.database_names(settings)
        assert cluster.ensure_databases(settings) == []  # reused, not recreated
        assert cluster.existing_databases(settings) == sorted(cluster.database_names(settings))
    finally:
        cluster.drop_databases(settings)
    assert cluster.existing_databases(settings) == []
