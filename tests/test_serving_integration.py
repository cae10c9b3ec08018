"""Real `bentoml serve` processes: BentoML's own client, concurrent load against the prediction log,
rollouts under continuous traffic (v1 -> v2 with no failed request; a broken version that never
serves), rollback, and teardown that leaves no process behind."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from serving_fixtures import (
    API_KEY,
    auth,
    continuous_load,
    fit_unservable_model,
    records,
    register_tiny_model,
    serving_home,
    shared_registry,
)

from medops.app.platform import serving_version
from medops.core.settings import Settings
from pipelines.model_registry import champion_version, set_champion
from pipelines.prediction_log import hash_encounter_id, read_predictions
from serving import processes, rollout
from serving.client import MedopsClient, ServiceError

pytestmark = pytest.mark.integration


STARTED: list[processes.ServerRecord] = []  # every server this module started (arbiter pids)


def server_processes(settings: Settings) -> set[int]:
    """Live processes of this MEDOPS_HOME's servers: the arbiters started, and every worker.

    Workers are found by their environment; an arbiter (circusd) rewrites its process title over
    its environment, so arbiters are the ones this module recorded starting.
    """
    found = set()
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if "_bentoml_impl" in " ".join(process.info["cmdline"] or []):
                if process.environ().get("MEDOPS_HOME") == str(settings.home):
                    found.add(process.pid)
        except psutil.Error:
            continue
    return found | {record.pid for record in STARTED if processes.is_running(record)}


@pytest.fixture(scope="module", autouse=True)
def record_starts() -> Iterator[None]:
    start = processes.start_server

    def recording(*args, **kwargs):
        record = start(*args, **kwargs)
        STARTED.append(record)
        return record

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(processes, "start_server", recording)
        yield


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    tracking_uri, _ = shared_registry()
    with serving_home(
        tmp_path_factory.mktemp("integration"),
        MEDOPS_MLFLOW_TRACKING_URI=tracking_uri,
        MEDOPS_SERVING_PORT=str(processes.find_free_port()),
        MEDOPS_SERVING_WORKERS="2",
        # these tests load the server with one key on purpose: per-key limits are tested in test_service_security
        MEDOPS_RATE_LIMIT_PER_SECOND="0",
        MEDOPS_CONCURRENCY_LIMIT="0",
    ) as settings:
        yield settings


@pytest.fixture(scope="module")
def versions(home: Settings) -> dict[str, str]:
    v1 = shared_registry()[1]
    v2 = register_tiny_model(home, threshold=0.5, alias=None)
    broken = register_tiny_model(home, model=fit_unservable_model(), alias=None, serialization_format="cloudpickle")
    set_champion(v1, home)
    return {"v1": v1, "v2": v2, "broken": broken}


@pytest.fixture(scope="module")
def stable(home: Settings, versions: dict[str, str]) -> Iterator[processes.ServerRecord]:
    record = rollout.serve(home)
    try:
        yield record
    finally:
        rollout.stop_all(home)
        assert len(STARTED) >= 2  # stable, and the v2 rollout's candidate (the pickled version never got one)
        assert server_processes(home) == set(), "processes left behind"
        assert processes.read_record(home, rollout.STABLE) is None


def test_bentoml_client_against_the_real_server(stable: processes.ServerRecord, versions: dict[str, str]):
    import bentoml

    assert stable.port != 3000 and stable.host == "127.0.0.1"
    assert len(processes.worker_pids(stable)) == 2
    with bentoml.SyncHTTPClient(stable.url, token=API_KEY, server_ready_timeout=30) as client:
        result = client.predict(records=records(2))
        assert result["model_version"] == versions["v1"]
        assert [p["encounter_id"] for p in result["predictions"]] == ["enc-0", "enc-1"]
        assert client.metadata()["model_version"] == versions["v1"]
    metrics = httpx.get(f"{stable.url}/metrics")  # open, like the health routes
    assert metrics.status_code == 200 and metrics.headers["x-model-version"] == versions["v1"]
    assert httpx.post(f"{stable.url}/predict", json={"records": records(1)}).status_code == 401


OVERSIZED = {"4MiB": 4 * 1024 * 1024, "64MiB": 64 * 1024 * 1024}


def _oversized_body(size: int) -> bytes:
    """A syntactically plausible JSON body of ``size`` bytes (the service must refuse it by size)."""
    head = b'{"records": [{"mean_radius": 1.0, "padding": "'
    return head + b"x" * (size - len(head) - 4) + b'"}]}'


def _urllib(url: str, body: bytes) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={**auth(), "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _requests(url: str, body: bytes) -> tuple[int, dict]:
    import requests

    response = requests.post(url, data=body, headers={**auth(), "Content-Type": "application/json"}, timeout=60)
    return response.status_code, response.json()


def _httpx(url: str, body: bytes) -> tuple[int, dict]:
    response = httpx.post(url, content=body, headers={**auth(), "Content-Type": "application/json"}, timeout=60)
    return response.status_code, response.json()


def _curl(url: str, body: bytes) -> tuple[int, dict]:
    import json
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        handle.write(body)
        handle.flush()
        done = subprocess.run(
            ["curl", "-sS", "--max-time", "60", "-w", "\\n%{http_code}", "-H", f"Authorization: Bearer {API_KEY}",
             "-H", "Content-Type: application/json", "--data-binary", f"@{handle.name}", url],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(text)


@pytest.mark.parametrize("size", list(OVERSIZED), ids=str)
@pytest.mark.parametrize("send", [_urllib, _requests, _httpx, _curl], ids=lambda f: f.__name__.strip("_"))
def test_an_oversized_body_gets_a_413_the_client_can_read(stable: processes.ServerRecord, send, size: str):
    """Never a reset connection: every common client reads the 413 and its reason."""
    status, body = send(f"{stable.url}/predict", _oversized_body(OVERSIZED[size]))
    assert status == 413, body
    assert "request body larger than" in body["error"]


def test_medops_client_against_the_real_server(stable: processes.ServerRecord, versions: dict[str, str]):
    with MedopsClient(stable.url, API_KEY, site_id="site-r") as service:
        assert service.ready() and service.last_model_version == versions["v1"]
        answer = service.predict(records(2))
        assert answer.model_version == service.last_model_version == versions["v1"]
        assert [p.encounter_id for p in answer.predictions] == ["enc-0", "enc-1"]
        assert service.metadata().model_version == versions["v1"]
    with MedopsClient(stable.url, "wrong-key") as service, pytest.raises(ServiceError) as refused:
        service.predict(records(1))
    assert refused.value.status == 401


def test_concurrent_load_logs_every_served_prediction(stable: processes.ServerRecord, home: Settings):
    served: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(thread: int) -> None:
        # no connection retries: a refused connection is a failure here, not something to paper over
        with MedopsClient(stable.url, API_KEY, timeout=30, connect_retries=0) as service:
            for n in range(15):
                body = [r | {"encounter_id": f"load-{thread}-{n}-{i}"} for i, r in enumerate(records(1 + n % 4))]
                try:
                    answer = service.predict(body)
                except ServiceError as error:
                    with lock:
                        failures.append(str(error))
                    continue
                with lock:
                    served.extend(p.encounter_id for p in answer.predictions)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    logged = read_predictions(home)
    wanted = {hash_encounter_id(encounter, home) for encounter in served}
    mine = logged[logged["encounter_hash"].isin(wanted)]
    assert len(served) == 12 * sum(1 + n % 4 for n in range(15))
    assert len(mine) == len(served)  # each served prediction logged exactly once
    assert mine["encounter_hash"].nunique() == len(served)
    assert len({Path(p).name for p in (home.predictions_dir / "log").glob("predictions-*.csv")}) >= 2  # 2 workers


def test_rollout_under_load_fails_no_request(
    stable: processes.ServerRecord, home: Settings, versions: dict[str, str], tmp_path: Path
):
    with continuous_load(stable.url, API_KEY, tmp_path, "rollout") as load:
        result = rollout.deploy(versions["v2"], home)
    assert load["failures"] == [], load["failures"][:5]
    assert load["sent"] > 50 and set(load["versions"]) == {versions["v1"], versions["v2"]}, load
    assert result.switch == "swap" and result.previous == versions["v1"]
    assert serving_version(home) == versions["v2"]  # what the stable endpoint's /readyz says
    assert champion_version(home) == versions["v2"]
    assert processes.read_record(home, rollout.CANDIDATE) is None  # the candidate was stopped
    assert processes.read_record(home, rollout.STABLE).pid == stable.pid  # same endpoint, same process
    # every prediction served during the switch is in the log, exactly once
    ids = (f"rollout-{t}-{n}-{i}" for t in range(4) for n in range(load["sent"]) for i in range(3))
    possible = {hash_encounter_id(encounter, home) for encounter in ids}
    logged = read_predictions(home)
    assert logged["encounter_hash"].isin(possible).sum() == load["predictions"]


def test_a_version_that_cannot_serve_leaves_the_old_one_serving(
    stable: processes.ServerRecord,
    home: Settings,
    versions: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    alerts: list[tuple[str, str]] = []
    monkeypatch.setattr(rollout, "_raise_alert", lambda title, details, settings: alerts.append((title, details)))
    set_champion(versions["broken"], home)  # what train_model's promotion did
    started = len(STARTED)
    with continuous_load(stable.url, API_KEY, tmp_path, "broken") as load:
        # a pickled model is refused before any process could unpickle it: no candidate is started
        with pytest.raises(rollout.DeployFailed, match="stored as cloudpickle"):
            rollout.deploy(versions["broken"], home)
    assert len(STARTED) == started
    assert load["failures"] == [] and set(load["versions"]) == {versions["v2"]}
    assert serving_version(home) == versions["v2"]  # what the stable endpoint's /readyz says
    assert champion_version(home) == versions["v2"]
    assert alerts and versions["broken"] in alerts[0][0]
    assert processes.read_record(home, rollout.CANDIDATE) is None
    # only the stable arbiter and its two workers are left: the candidate's processes are gone
    assert server_processes(home) == {stable.pid, *processes.worker_pids(stable)}
