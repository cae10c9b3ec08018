"""The core supervisor on real processes: a circus-like parent whose child left its session is
stopped with the child, a recycled pid is never signalled, strays are found by their marker, and
waits keep their contract (what exited, what timed out)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from medops.core import processes
from medops.core.settings import Settings

# Like a circus arbiter: its worker runs in a session of its own, out of reach of a group signal.
LEADER = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    from pathlib import Path
    graceful = sys.argv[2] == "graceful"
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    def stop(*_):
        if graceful:
            worker.terminate()
            worker.wait()
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    Path(sys.argv[1]).write_text(str(worker.pid))
    while True:
        time.sleep(1)
    """
)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _sleeper(**env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True, env={**os.environ, **env}
    )


@pytest.mark.parametrize("behaviour", ["graceful", "leaves-its-worker"])
def test_stop_ends_the_leader_and_the_worker_that_left_its_session(
    medops_home: Settings, tmp_path: Path, behaviour: str
):
    script, worker_file = tmp_path / "leader.py", tmp_path / "worker.pid"
    script.write_text(LEADER)
    argv = [sys.executable, str(script), str(worker_file), behaviour]
    pid = processes.start("leader", argv, medops_home, cwd=tmp_path)
    assert processes.start("leader", argv, medops_home, cwd=tmp_path) == pid  # running: not started twice
    worker = int(processes.wait_until(lambda: worker_file.exists() and worker_file.read_text(), 30, "the worker"))
    assert os.getsid(worker) != os.getsid(pid)
    record = processes.read_record("leader", medops_home)
    assert record.pid == pid and processes.descendants(record)[0].pid == worker
    started = time.monotonic()
    assert processes.stop("leader", medops_home, timeout=10)
    assert _gone(pid) and _gone(worker)
    assert time.monotonic() - started < 10  # an orphan waits a short grace, not the whole timeout
    assert processes.running("leader", medops_home) is None
    assert not processes.record_path("leader", medops_home).exists()
    assert not processes.stop("leader", medops_home)


def test_a_recycled_pid_is_not_signalled(medops_home: Settings):
    other = _sleeper()
    try:
        record = processes.ProcessRecord(
            pid=other.pid, create_time=psutil.Process(other.pid).create_time() - 1000, log="x", started_at="then"
        )
        assert not processes.is_running(record) and processes.descendants(record) == []
        processes.write_record("recycled", record, medops_home)
        assert processes.stop_process(record, timeout=1) == []
        assert not processes.stop("recycled", medops_home, timeout=1)
        time.sleep(0.3)
        assert other.poll() is None, "a process that merely got the recorded pid was signalled"
    finally:
        other.kill()
        other.wait()


def test_stop_strays_ends_what_carries_the_platform_marker(medops_home: Settings):
    stray = _sleeper(**{processes.PLATFORM_MARKER: str(medops_home.home)})
    bystander = _sleeper(**{processes.PLATFORM_MARKER: "/another/home"})
    try:
        processes.wait_until(lambda: stray.pid in processes.strays(medops_home), 10, "the stray's environment")
        assert processes.stop_strays(medops_home, timeout=5) == [stray.pid]
        assert stray.wait(5) is not None and bystander.poll() is None
    finally:
        for process in (stray, bystander):
            process.kill()
            process.wait()


def test_child_env_exports_the_settings_the_caller_holds(medops_home: Settings, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEDOPS_SERVING_PORT", "1")  # inherited, but not what these settings say
    monkeypatch.setenv("MEDOPS_API_KEYS", "inherited-key")  # unset in these settings: not passed on
    monkeypatch.setenv("MEDOPS_DEBUG", "1")  # not a setting: passed on
    settings = medops_home.model_copy(update={"serving_port": 3999, "require_approval": True})
    env = processes.child_env(settings, {"MEDOPS_SERVING_BENTO": "svc:3"})
    assert env["MEDOPS_HOME"] == str(medops_home.home) and env["MEDOPS_SERVING_PORT"] == "3999"
    assert env["MEDOPS_REQUIRE_APPROVAL"] == "true" and "MEDOPS_API_KEYS" not in env
    assert env["MEDOPS_DEBUG"] == "1" and env["MEDOPS_SERVING_BENTO"] == "svc:3"
    assert env[processes.PLATFORM_MARKER] == str(medops_home.home)
    assert env["BENTOML_HOME"] == str(medops_home.bentoml_home)
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_wait_until_returns_the_value_or_names_what_failed():
    calls = []

    def third_time() -> str | None:
        calls.append(1)
        return "ready" if len(calls) == 3 else None

    assert processes.wait_until(third_time, 5, "the thing", poll=0.01) == "ready" and len(calls) == 3
    with pytest.raises(RuntimeError, match=r"^the API server: the process exited; see its log$"):
        processes.wait_until(lambda: None, 5, "the API server", poll=0.01, alive=lambda: False, hint="see its log")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^the scheduler: not ready after 0s; look at the UI$"):
        processes.wait_until(lambda: 0, 0.3, "the scheduler", poll=0.05, hint="look at the UI")
    assert 0.3 <= time.monotonic() - started < 2


def test_poll_until_gives_up_with_the_last_value_and_lets_errors_through():
    calls = []

    def never() -> list[int]:
        calls.append(1)
        return []

    assert processes.poll_until(never, 0.1, 0.02) == [] and len(calls) >= 2
    with pytest.raises(KeyError):
        processes.poll_until(lambda: {}["missing"], 5, 0.01)


def test_the_ui_processes_get_no_service_keys(medops_home, monkeypatch):
    """MLflow's and Evidently's UIs never call the service: its bearer keys stay out of their environment."""
    from medops.core.processes import child_env
    from medops.core.settings import Settings

    settings = Settings(home=medops_home.home, api_keys="k-one,k-two")
    assert child_env(settings)["MEDOPS_API_KEYS"] == "k-one,k-two"
    monkeypatch.setenv("MEDOPS_API_KEYS", "k-inherited")
    assert "MEDOPS_API_KEYS" not in child_env(settings, service_keys=False)
