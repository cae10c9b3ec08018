"""A rollout killed at each step, then retried: a champion answers on the stable port throughout.

The rollout runs in a child process whose ``MEDOPS_TEST_CRASH_AT`` names a step
(``serving.rollout.CRASH_POINTS``): it ends there with ``os._exit``, which runs no ``finally``,
no ``except`` and no exit handler, as a ``kill -9`` would; the servers it started live on, in
sessions of their own. Then, before any retry: the stable port answers ``/predict``, every
worker with the version the workers were last asked for (the old version until the switch was
requested, the new one from then on), and every serving process of this MEDOPS_HOME belongs to
a recorded server (so ``medops serve-stop`` and the next rollout find it). The retry, in this
(another) process as deploy_model's Airflow retry or the next ``medops deploy`` would run it,
completes: the new version serves, ``@champion`` and the stable server's record name it, its
account of what served before is what did serve, and only the stable server's processes remain.

One stable server (two workers) serves the whole module; each step deploys the version it is
not serving, and both Bentos are built once, so a step costs one or two candidate starts.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving_fixtures import auth, records, register_tiny_model, serving_home, shared_registry

from medops.core.audit import verify
from medops.core.processes import CRASH_AT_VARIABLE, CRASH_EXIT_CODE, poll_until, strays
from medops.core.settings import REPO_ROOT, Settings
from pipelines.model_registry import champion_version, set_champion
from serving import control, processes, rollout

pytestmark = pytest.mark.integration

BEFORE_THE_SWITCH = ("after_build", "after_candidate_start")
FIRST_DEPLOYMENT = "after_stable_start"  # only reached when no stable server runs

KILLED_ROLLOUT = (
    "import sys\n"
    "from medops.core.settings import get_settings\n"
    "from serving.rollout import deploy\n"
    "deploy(sys.argv[1], get_settings())\n"
)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    tracking_uri, _ = shared_registry()
    with serving_home(
        tmp_path_factory.mktemp("rollout-crashes"),
        MEDOPS_MLFLOW_TRACKING_URI=tracking_uri,
        MEDOPS_SERVING_PORT=str(processes.find_free_port()),
        MEDOPS_SERVING_WORKERS="2",
        MEDOPS_RATE_LIMIT_PER_SECOND="0",
        MEDOPS_CONCURRENCY_LIMIT="0",
    ) as settings:
        yield settings


@pytest.fixture(scope="module")
def versions(home: Settings) -> Iterator[tuple[str, str]]:
    v1 = shared_registry()[1]
    v2 = register_tiny_model(home, threshold=0.5, alias=None)
    set_champion(v1, home)
    for version in (v1, v2):
        rollout.prepare_bento(version, home)
    rollout.serve(home)
    try:
        yield v1, v2
    finally:
        rollout.stop_all(home)
        assert strays(home) == [], "serving processes left behind"


def _killed_rollout(version: str, step: str, settings: Settings) -> subprocess.CompletedProcess:
    env = processes.child_env(settings, {CRASH_AT_VARIABLE: step, "PYTHONPATH": str(REPO_ROOT)})
    return subprocess.run(
        [sys.executable, "-c", KILLED_ROLLOUT, version],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _settled_version(settings: Settings) -> str:
    """The version the stable port serves, once every worker took the one it was last asked for."""
    record = rollout.stable_server(settings)
    assert record is not None, "nothing serves on the stable port"
    processes.wait_ready(record, timeout=120)
    directory = Path(record.control_dir or "")
    requested = control.requested_model(directory)

    def converged() -> bool:
        workers, acks = processes.worker_pids(record), control.read_acks(directory)
        return bool(workers) and all(
            pid in acks and acks[pid]["model_version"] == requested and not acks[pid]["error"] for pid in workers
        )

    assert poll_until(converged, 60, 0.1), f"the workers did not all take model version {requested}"
    answers = set()
    for n in range(12):  # a fresh connection each time: the workers share the port
        response = httpx.post(f"{record.url}/predict", json={"records": records(1, start=n)}, headers=auth())
        assert response.status_code == 200, response.text
        answers.add(response.headers["x-model-version"])
    assert answers == {requested}
    return str(requested)


def _unrecorded_server_processes(settings: Settings) -> set[int]:
    """Live processes of this MEDOPS_HOME's servers that no server record accounts for."""
    known: set[int] = set()
    for role in (rollout.STABLE, rollout.CANDIDATE):
        record = processes.read_record(settings, role)
        if record is not None and processes.is_running(record):
            known |= {record.pid, *processes.worker_pids(record)}
    return set(strays(settings)) - known


@pytest.mark.parametrize("step", rollout.CRASH_POINTS)
def test_a_rollout_killed_at_each_step_leaves_a_serving_champion(home: Settings, versions: tuple[str, str], step: str):
    v1, v2 = versions
    serving = rollout.stable_server(home)
    assert serving is not None
    target = v2 if serving.model_version == v1 else v1
    before: str | None = serving.model_version
    if step == FIRST_DEPLOYMENT:
        rollout.stop_serving(home)
        before = None
    set_champion(target, home)  # what train_model's promotion does before deploy_model runs

    crashed = _killed_rollout(target, step, home)
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr[-3000:]

    served = _settled_version(home)
    assert served == (before if step in BEFORE_THE_SWITCH else target)
    assert _unrecorded_server_processes(home) == set()

    result = rollout.deploy(target, home)  # the retry

    assert result.previous == served  # its account of what served is what did
    assert _settled_version(home) == target == champion_version(home)
    stable = rollout.stable_server(home)
    assert stable is not None and stable.model_version == target
    assert processes.read_record(home, rollout.CANDIDATE) is None
    assert set(strays(home)) <= {stable.pid, *processes.worker_pids(stable)}  # the candidate's are gone
    assert rollout.deployments(home)[-1]["version"] == target
    assert verify(home).ok
