"""The whole loop in the cluster profile, on the machine's PostgreSQL and Redis.

`medops up --profile cluster` on a temporary MEDOPS_HOME, free loopback ports, databases with a
prefix of the test's own and a Redis database of its own starts Airflow's four components and two
Celery workers on PostgreSQL, MLflow's tracking server on PostgreSQL (artifacts proxied), the
WebDAV server of the DVC remote and the Evidently UI. Then the standalone test's scenario: seed
lands -> champion v1 serving -> drifted traffic -> drift -> alert -> retrain -> new champion, with a
separate process calling /predict and seeing no failed request. On top: training ran on the
`train` queue on Celery train workers standing for other hosts (their logs say which, with a
MEDOPS_HOME of their own holding a clone of the registry from its git daemon and a DVC cache
filled over WebDAV, and no secrets folder), task logs are readable through the REST API
with no log server listening, the data registry's remote is the WebDAV server, the doors are locked
as in the standalone test (loopback only, MLflow's tracking server behind its password, no secret
in a file or in what `up` printed), `medops down` leaves no process and no listening port, and the
databases are medops' own (dropped at the end). Last, two data versions train at once (two
train_model runs overlapping on the workers) and the model registry, the data registry and the
audit chain come out consistent.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from medops.app import netns
from medops.core.processes import poll_until
from medops.core.settings import Settings
from tests.test_alerts import smtp, webhook  # noqa: F401  (fixtures: local alert sinks)
from tests.test_end_to_end import (
    BIN,
    Stages,
    _describe,
    _free_port,
    _medops,
    _monitor,
    _platform_processes,
    _steady_load,
    _wait,
    assert_doors_locked,
    platform_secrets,
)

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.timeout(2400)]

REDIS_DB = 11  # Celery's queues for this test only; flushed at the end


def _services_reachable() -> bool:
    for port in (5432, 6379):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            return False
    return True


def _task_log(base: str, password: str, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """A task's log as the UI shows it (REST), read by the API server with no log server to ask."""
    token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": password}, timeout=30)
    headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
    response = httpx.get(
        f"{base}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/1",
        params={"map_index": map_index},
        headers=headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text[:500]
    return "\n".join(str(line.get("event", "")) for line in response.json()["content"])


def _train_worker_of(step: str, log: str, home: Path, registry_port: int) -> Path:
    """The home of the train worker a step's log says it ran on: its own, not the scheduler's, with
    the registry read from the git daemon, not from the scheduler's disk."""
    import re

    found = re.search(
        rf"{step} ran on host \S+ as (airflow-worker-\d+) with MEDOPS_HOME (\S+), registry (\S+)"
        r" in network namespace (\S+)",
        log,
    )
    assert found, log[-2000:]
    name, worker_home, registry, network = found.groups()
    assert Path(worker_home) == home / "hosts" / name, found.group(0)
    # in a network namespace of its own (we are root, with `ip`): not this one, and the registry is
    # cloned through the worker's gateway, the host side of its veth pair
    assert network != os.readlink("/proc/self/ns/net"), found.group(0)
    gateways = netns.gateway_addresses(Settings(home=home))
    assert registry in {f"git://{address}:{registry_port}/registry" for address in gateways}, (found.group(0), gateways)
    return Path(worker_home)


def _assert_walled_in(home: Path, ports: dict[str, int]) -> None:
    """From inside a train worker's namespace, the services' loopback address answers nothing; the
    gateway's address (the veth's host side) reaches them: the worker's only way out."""
    settings = Settings(home=home)
    namespaces = netns.namespaces(settings)
    assert len(namespaces) == settings.cluster_workers, namespaces
    gateways = netns.gateways(settings)
    probe = (
        "import socket, sys\n"
        "host, port = sys.argv[1], int(sys.argv[2])\n"
        "try:\n    socket.create_connection((host, port), timeout=3).close(); print('open')\n"
        "except OSError as e:\n    print('closed', e)\n"
    )
    for namespace in namespaces:
        for port in (5432, ports["MLFLOW"]):
            inside = [sys.executable, "-c", probe, "127.0.0.1", str(port)]
            out = subprocess.run(["ip", "netns", "exec", namespace, *inside], capture_output=True, text=True)
            assert out.stdout.startswith("closed"), (namespace, port, out.stdout, out.stderr)
        gateway = gateways[netns.names(settings, int(namespace.rsplit("-w", 1)[1]))[1]]
        for port in (5432, ports["MLFLOW"]):
            inside = [sys.executable, "-c", probe, gateway, str(port)]
            out = subprocess.run(["ip", "netns", "exec", namespace, *inside], capture_output=True, text=True)
            assert out.stdout.startswith("open"), (namespace, gateway, port, out.stdout, out.stderr)


def _assert_another_host(worker_home: Path) -> None:
    """What a train worker's disk holds after training: its clone of the registry, a DVC cache filled
    from the remote, the rows it restored; no secrets folder, no registry of its own, no work folder left."""
    clone = worker_home / "registry-clone"
    assert (clone / ".git").is_dir(), sorted(p.name for p in worker_home.iterdir())
    assert [p for p in (clone / ".dvc" / "cache").rglob("*") if p.is_file()], "no DVC cache filled from the remote"
    assert (worker_home / "cache" / "data-v1").is_dir()
    assert not (worker_home / "secrets").exists() and not (worker_home / "registry").exists()
    assert not [p for p in (worker_home / "training").rglob("*") if p.is_file()]


def _listening(ports: list[int], pids: list[int] | None = None) -> list[int]:
    """Those of ``ports`` with a listening socket (of one of ``pids``, if given: other people's
    Airflow on this machine may serve logs on 8793 too)."""
    import psutil

    open_ports = {
        c.laddr.port
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and (pids is None or c.pid in pids)
    }
    return sorted(open_ports & set(ports))


@pytest.fixture
def own_databases(tmp_path: Path):
    """The test's database prefix and Redis database, emptied before and, whatever fails, after."""
    import redis

    from medops.app import cluster

    assert _services_reachable(), "the cluster profile needs PostgreSQL on 127.0.0.1:5432 and Redis on :6379"
    settings = Settings(home=tmp_path / "medops-home", cluster_db_prefix=f"medops_e2e_{os.getpid()}", profile="cluster")
    broker = redis.Redis.from_url(f"redis://127.0.0.1:6379/{REDIS_DB}")
    cluster.drop_databases(settings)
    broker.flushdb()
    yield settings
    cluster.drop_databases(settings)
    broker.flushdb()
    assert cluster.existing_databases(settings) == []


def test_the_loop_in_the_cluster_profile(own_databases: Settings, webhook, smtp, capsys, monkeypatch):  # noqa: F811
    import multiprocessing

    import mlflow

    from medops.app import cluster
    from medops.app.airflow_api import AirflowClient, admin_password
    from pipelines.data import seed_frame
    from pipelines.schema import FEATURES
    from serving.client import MedopsClient

    settings = own_databases
    home, prefix = settings.home, settings.cluster_db_prefix
    ports = {name: _free_port() for name in ("AIRFLOW", "MLFLOW", "SERVING", "EVIDENTLY", "WEBDAV", "REGISTRY")}
    redis_url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDOPS_", "AIRFLOW"))}
    env.update({f"MEDOPS_{name}_PORT": str(port) for name, port in ports.items()})
    env.update(
        {
            "MEDOPS_HOME": str(home),
            "MEDOPS_CLUSTER_DB_PREFIX": prefix,
            "MEDOPS_REDIS_URL": redis_url,
            "MEDOPS_API_KEYS": "e2e-key",
            "MEDOPS_ALERT_WEBHOOK_URL": webhook.url,
            "MEDOPS_SMTP_HOST": "127.0.0.1",
            "MEDOPS_SMTP_PORT": str(smtp.port),
            "MEDOPS_ALERT_EMAIL_TO": "oncall@hospital.example",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        }
    )
    serving = f"http://127.0.0.1:{ports['SERVING']}"
    airflow_url = f"http://127.0.0.1:{ports['AIRFLOW']}"
    stages = Stages()
    airflow = None
    try:
        # 1. the profile comes up on medops' own databases and lands the seed.
        up = _medops(env, "up", "--profile", "cluster")
        assert "Profile     cluster" in up.stdout
        assert cluster.existing_databases(settings) == sorted(cluster.database_names(settings))
        stages.done("up --profile cluster: seed lands -> champion v1 serving")
        password = admin_password(settings)
        assert password
        airflow = AirflowClient(airflow_url, password=password)
        # deploy_model may still be stopping its candidate when the champion answers
        for dag_id in ("ingest_data", "train_model", "deploy_model"):
            (run,) = airflow.runs(dag_id)
            assert airflow.wait_for_run(dag_id, run.dag_run_id, timeout=300).state.value == "success", dag_id
        with MedopsClient(serving, "e2e-key", timeout=10) as service:
            assert service.metadata().model_version == "1"

        # Training ran on the train queue, on a Celery worker, and its log reads through the API.
        run_id = airflow.runs("train_model")[0].dag_run_id
        fit = next(ti for ti in airflow.task_instances("train_model", run_id) if ti.task_id == "fit")
        assert fit.queue == "train", fit.queue
        log = _task_log(airflow_url, password, "train_model", run_id, "fit")
        fitted_on = _train_worker_of("fit", log, home, ports["REGISTRY"])
        # The model search fanned out: one mapped task per family, on the train queue, on workers.
        searches = [ti for ti in airflow.task_instances("train_model", run_id) if ti.task_id == "search"]
        assert sorted(ti.map_index for ti in searches) == [0, 1, 2], searches
        assert {ti.queue for ti in searches} == {"train"} and {ti.state.value for ti in searches} == {"success"}
        searched_on = {
            _train_worker_of("search", _task_log(airflow_url, password, "train_model", run_id, "search", i), home,
                             ports["REGISTRY"])
            for i in (0, 1, 2)
        }  # fmt: skip
        for worker_home in searched_on | {fitted_on}:
            _assert_another_host(worker_home)
        _assert_walled_in(home, ports)
        # No Airflow log server (8793/8794) is listening: the components run with --skip-serve-logs.
        assert _listening([8793, 8794], pids=_platform_processes(home)) == []

        # Data went through the WebDAV remote; models through the tracking server's proxied artifacts.
        dvc_config = (home / "registry" / ".dvc" / "config").read_text()
        assert f"webdav://127.0.0.1:{ports['WEBDAV']}" in dvc_config, dvc_config
        remote_files = [p for p in (home / "dvc-remote").rglob("*") if p.is_file()]
        assert remote_files, "nothing was pushed to the DVC remote"
        mlflow_url = f"http://127.0.0.1:{ports['MLFLOW']}"
        assert_doors_locked(home, mlflow_url, platform_secrets(home, ["e2e-key"]), up.stdout + up.stderr)
        for name, value in settings.mlflow_credentials().items():  # the tracking server asks for them
            monkeypatch.setenv(name, value)
        client = mlflow.MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
        champion = client.get_model_version_by_alias("breast_cancer_diagnosis", "champion")
        assert champion.version == "1"
        assert client.get_run(champion.run_id).info.artifact_uri.startswith("mlflow-artifacts:")

        # 2. drifted traffic with labels, under continuous load from another process.
        stop, counts = multiprocessing.Event(), multiprocessing.Array("i", 2)
        row = seed_frame().iloc[5]
        record = {name: float(row[name]) for name in FEATURES}
        load = multiprocessing.Process(
            target=_steady_load, args=(serving, "e2e-key", record, stop, counts), daemon=True
        )
        load.start()
        try:
            window = datetime.now(UTC).isoformat()
            _medops(
                env, "simulate", "--site", "site-d", "--records", "400", "--drift", "covariate", "--feedback", "--json"
            )
            verdict = _monitor(airflow, since=window)
            assert verdict["verdict"] == "drift", verdict
            stages.done("drifted traffic -> drift")
            _wait(lambda: webhook.received and smtp.received, 60, "the drift alert at both sinks")
            assert "site-d" in str(webhook.received[0])

            def drift_training():
                done = [r for r in airflow.runs("train_model")[:-1] if r.state.value in ("success", "failed")]
                return done[0] if done else None

            assert _wait(drift_training, 420, "train_model run from medops/drift").state.value == "success"

            def serving_new_version() -> str | None:
                version = httpx.get(f"{serving}/livez", timeout=5).headers.get("x-model-version")
                return version if version not in (None, "1") else None

            new = _wait(serving_new_version, 420, "a new champion serving")
            stages.done("retrain on a worker -> new champion serving")
        finally:
            stop.set()
            load.join(timeout=60)
        served, failed = counts[0], counts[1]
        assert served > 20 and failed == 0, f"{failed} failed of {served + failed} requests during the rollout"
        assert client.get_model_version_by_alias("breast_cancer_diagnosis", "champion").version == new

        # 3. two data versions at once: two train_model runs side by side on the workers.
        _concurrent_trainings(airflow, client, settings, env, serving)
        stages.done("two data versions -> two concurrent trainings -> one champion serving")
    finally:
        if airflow is not None:
            airflow.close()
        started = time.monotonic()
        subprocess.run([str(BIN / "medops"), "down"], env=env, capture_output=True, timeout=300)
        stages.done(f"down ({time.monotonic() - started:.0f}s)")
        with capsys.disabled():
            print("\ncluster end-to-end stages:", stages.report())
    # 3. nothing left running, no port left open; the databases stay for a reuse until dropped.
    poll_until(lambda: not _platform_processes(home), 60, 1.0)
    assert _platform_processes(home) == [], _describe(_platform_processes(home))
    assert _listening(list(ports.values())) == []
    assert netns.namespaces(settings) == [] and netns.gateway_addresses(settings) == set()
    assert cluster.existing_databases(settings) == sorted(cluster.database_names(settings))


def _concurrent_trainings(airflow, client, settings: Settings, env: dict[str, str], serving: str) -> None:
    """Two batches versioned, then train_model triggered on each at once: both runs log and register,
    with distinct version numbers and their own data version; @champion ends on the version promoted
    last, which passed the gate; the data registry and the audit chain are intact; the new champion serves."""
    import json

    from bench.fixtures import synthetic_rows
    from pipelines import data_registry, governance
    from pipelines.data import write_frame

    ingested = []
    for index in (1, 2):
        batch = write_frame(synthetic_rows(150, rng_seed=700 + index), settings.home / f"concurrent-{index}.csv")
        ingested.append(json.loads(_medops(env, "ingest", str(batch), "--json").stdout))
    versions = [result["version"] for result in ingested]
    assert all(versions) and versions[0] != versions[1], ingested
    run_ids = [airflow.trigger("train_model", {"data_version": version}) for version in versions]
    runs = [airflow.wait_for_run("train_model", run_id, timeout=900) for run_id in run_ids]
    assert [run.state.value for run in runs] == ["success", "success"], runs
    assert max(run.start_date for run in runs) < min(run.end_date for run in runs), "the runs did not overlap"

    registered = [airflow.xcom("train_model", run_id, "register") for run_id in run_ids]
    numbers = [item["model_version"] for item in registered]
    assert len(set(numbers)) == 2, registered
    for item, version in zip(registered, versions, strict=True):
        model_version = client.get_model_version("breast_cancer_diagnosis", item["model_version"])
        assert model_version.run_id == item["mlflow_run_id"]
        assert model_version.tags["data_version"] == version
        assert client.get_run(item["mlflow_run_id"]).data.tags["data_version"] == version
    # Promotions are audited in the order the alias moved (under the champion lock): the last one holds it.
    promotions = {
        number: entry.seq for number in numbers for entry in governance.entries_about(number, settings, ("promotion",))
    }
    assert promotions, "neither concurrent training was promoted"
    champion = client.get_model_version_by_alias("breast_cancer_diagnosis", "champion")
    assert champion.version == max(promotions, key=promotions.get), promotions
    assert champion.tags["gate_passed"] == "true"
    if len(promotions) == 2:  # the later was judged against the earlier, at its gate or again when promoting
        assert champion.tags["champion_compared"] == min(promotions, key=promotions.get), champion.tags

    # The registry: versions numbered without a gap, each batch once, rows adding up.
    tags = data_registry.list_versions(settings)
    assert tags == [f"data-v{n}" for n in range(1, len(tags) + 1)] and tags[-2:] == versions
    first, second = (data_registry.describe_version(version, settings) for version in versions)
    assert second.rows == first.rows + ingested[1]["accepted"]
    manifest = json.loads((settings.registry_dir / data_registry.MANIFEST).read_text())
    assert [r.get("version") for r in manifest["batches"] if r.get("version") in versions] == versions
    _medops(env, "audit", "verify")

    def serving_champion() -> bool:
        return httpx.get(f"{serving}/livez", timeout=5).headers.get("x-model-version") == champion.version

    try:
        _wait(serving_champion, 600, f"model version {champion.version} serving")
    except TimeoutError as error:  # CI keeps no MEDOPS_HOME: say what the rollouts did
        deploys = [
            (run.dag_run_id, run.state.value, [(ti.task_id, ti.state and ti.state.value)
                                              for ti in airflow.task_instances("deploy_model", run.dag_run_id)])
            for run in airflow.runs("deploy_model")
        ]  # fmt: skip
        from medops.core import audit
        from serving.rollout import deployments

        trail = [(e.action, e.links.get("model_version"), e.reason[:300]) for e in audit.entries(settings)][-8:]
        history = deployments(settings)
        raise AssertionError(f"{error}\ndeploy_model runs: {deploys}\ndeployments: {history}\naudit: {trail}") from None
