"""Rollout logic without servers: step order, fallback on every failure, rollback choice, the
control-file swap protocol, and stopping a circus-like process tree without leaking a process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from medops.core.processes import poll_until
from medops.core.settings import Settings
from pipelines import governance
from serving import control, processes, rollout
from serving.processes import ServerRecord


def fake_record(settings: Settings, role: str, version: str, port: int = 1) -> ServerRecord:
    return ServerRecord(
        role=role,
        pid=os.getpid(),
        create_time=psutil.Process().create_time(),
        port=port,
        host="127.0.0.1",
        bento=f"breast_cancer_diagnosis_service:{version}",
        model_version=version,
        log=str(settings.run_dir / f"{role}.log"),
        control_dir=str(rollout.control_dir(settings)),
        started_at="now",
    )


class FakePlatform:
    """Stands in for MLflow, BentoML and the servers; records what the rollout did, in order."""

    def __init__(self, settings: Settings, monkeypatch: pytest.MonkeyPatch, serving: str | None = "1") -> None:
        self.settings = settings
        self.champion = serving
        self.calls: list[tuple[str, Any]] = []
        self.alerts: list[str] = []
        self.fail_at: str | None = None
        self.failed_gates: set[str] = set()
        self.anchored: list[tuple[int, str]] = []
        self.stable = fake_record(settings, rollout.STABLE, serving, port=settings.serving_port) if serving else None
        patch = monkeypatch.setattr
        patch(rollout, "prepare_bento", self.step("prepare", lambda v, s, **k: rollout.PreparedBento(v, "m", f"b:{v}")))
        patch(rollout, "expected_predictions", self.step("expected", lambda v, s: ("rows", "p", "labels")))
        patch(rollout, "stable_server", lambda s: self.stable)
        patch(rollout, "smoke_test", self.step("smoke", lambda url, v, s, **k: None, key=lambda url, v, *a, **k: url))
        patch(rollout, "switch_stable", self.step("switch", self._switch, key=lambda r, v, *a, **k: v))
        patch(rollout, "start_stable", self.step("start_stable", self._start_stable))
        patch(rollout, "_champion_version", lambda s: self.champion)
        patch(rollout, "_set_champion", self.step("champion", self._set_champion, key=lambda v, s: v))
        patch(rollout, "_raise_alert", lambda title, details, s: self.alerts.append(title))
        patch(rollout, "_gate_status", lambda v, s: (str(v) not in self.failed_gates, "sensitivity lower bound 0.80"))
        patch(governance, "anchor", lambda entry, s, model_version: self.anchored.append((entry.seq, model_version)))
        by_role = lambda record, *a, **k: record.role  # noqa: E731
        start = self.step("start_candidate", self._start_candidate, key=lambda s, **k: k["role"])
        patch(processes, "start_server", start)
        patch(processes, "wait_ready", lambda record, timeout: None)
        patch(processes, "stop_server", self.step("stop", lambda record, s=None, **k: None, key=by_role))

    def step(self, name: str, func, key=lambda *a, **k: a[0] if a else None):
        def run(*args, **kwargs):
            self.calls.append((name, key(*args, **kwargs)))
            if self.fail_at == f"{name}:{key(*args, **kwargs)}" or self.fail_at == name:
                raise RuntimeError(f"{name} failed")
            return func(*args, **kwargs)

        return run

    def _switch(self, record: ServerRecord, version: str, settings: Settings, **kwargs: Any) -> ServerRecord:
        record.model_version = version
        return record

    def _start_stable(self, bento: str, version: str, settings: Settings, **kwargs: Any) -> ServerRecord:
        self.stable = fake_record(settings, rollout.STABLE, version, port=settings.serving_port)
        return self.stable

    def _start_candidate(self, settings: Settings, **kwargs: Any) -> ServerRecord:
        return fake_record(settings, kwargs["role"], kwargs["model_version"], port=kwargs["port"])

    def _set_champion(self, version: str, settings: Settings) -> None:
        self.champion = version

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def settings(medops_home: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("MEDOPS_SERVING_PORT", "18999")
    from medops.core.settings import get_settings, reset_settings

    reset_settings()
    return get_settings()


def test_deploy_swaps_the_running_server_after_the_candidate_passed(settings: Settings, monkeypatch):
    platform = FakePlatform(settings, monkeypatch, serving="1")
    platform.champion = "2"  # train_model promoted it
    result = rollout.deploy("2", settings)
    assert platform.names() == ["prepare", "expected", "start_candidate", "smoke", "switch", "smoke", "stop"]
    candidate_url = platform.calls[3][1]
    assert candidate_url != platform.stable.url and platform.calls[5] == ("smoke", platform.stable.url)
    assert (result.version, result.previous, result.switch) == ("2", "1", "swap")
    assert platform.champion == "2" and not platform.alerts
    assert [entry["version"] for entry in rollout.deployments(settings)] == ["2"]


def test_manual_deploy_moves_champion(settings: Settings, monkeypatch):
    platform = FakePlatform(settings, monkeypatch, serving="2")
    rollout.deploy("1", settings)
    assert ("champion", "1") in platform.calls and platform.champion == "1"


def test_first_deploy_starts_the_stable_server(settings: Settings, monkeypatch):
    platform = FakePlatform(settings, monkeypatch, serving=None)
    platform.champion = "1"
    result = rollout.deploy("1", settings)
    assert "start_stable" in platform.names() and "switch" not in platform.names()
    assert result.switch == "start" and result.previous is None


@pytest.mark.parametrize("failing", ["prepare", "expected", "start_candidate", "smoke:candidate"])
def test_failure_before_the_switch_keeps_the_old_version(settings: Settings, monkeypatch, failing: str):
    platform = FakePlatform(settings, monkeypatch, serving="1")
    platform.champion = "2"
    platform.fail_at = failing
    if failing == "smoke:candidate":
        platform.fail_at = None
        original = rollout.smoke_test

        def smoke(url, version, s, **kwargs):
            if url != platform.stable.url:
                raise rollout.SmokeTestFailed("labels differ")
            return original(url, version, s, **kwargs)

        monkeypatch.setattr(rollout, "smoke_test", smoke)
    with pytest.raises(rollout.DeployFailed):
        rollout.deploy("2", settings)
    assert "switch" not in platform.names()
    assert platform.stable.model_version == "1"
    assert platform.champion == "1"  # pointed back at what serves
    assert platform.alerts == ["medops deploy of model version 2 failed"]
    if failing not in ("prepare", "expected", "start_candidate"):
        assert platform.calls[-1] == ("stop", rollout.CANDIDATE)
    assert rollout.deployments(settings) == []


def test_a_rollout_of_a_superseded_champion_leaves_the_newer_promotion_alone(settings: Settings, monkeypatch):
    """deploy_model chose v3 from @champion; v4 was promoted before the rollout began (two trainings
    at once). Serving v3 must not point @champion back at v3: v4's own deploy run serves it next (the
    cluster test once saw v3 deployed twice and v4 never)."""
    platform = FakePlatform(settings, monkeypatch, serving="2")
    platform.champion = "4"
    result = rollout.deploy("3", settings, champion_seen="3")
    assert result.version == "3" and platform.champion == "4" and ("champion", "3") not in platform.calls
    platform.champion = "5"  # nobody moved it since the caller looked: a manual deploy moves it
    rollout.deploy("3", settings)
    assert platform.champion == "3"


def test_a_failed_rollout_leaves_champion_alone_when_a_concurrent_promotion_moved_it(settings: Settings, monkeypatch):
    """v2 fails its smoke test after a concurrent training promoted v3: @champion stays on v3 (its own
    deploy run serves it next) instead of going back to v1, which would undo that promotion."""
    platform = FakePlatform(settings, monkeypatch, serving="1")
    platform.champion = "2"

    def smoke(url, version, s, **kwargs):
        platform.champion = "3"  # promoted meanwhile, under the champion lock
        raise rollout.SmokeTestFailed("labels differ")

    monkeypatch.setattr(rollout, "smoke_test", smoke)
    with pytest.raises(rollout.DeployFailed):
        rollout.deploy("2", settings)
    assert platform.stable.model_version == "1" and platform.champion == "3"
    assert ("champion", "1") not in platform.calls
    from medops.core import audit

    assert "@champion unchanged (v3)" in [e for e in audit.entries(settings) if e.action == "rollback"][-1].reason


def test_failure_after_the_switch_switches_back(settings: Settings, monkeypatch):
    platform = FakePlatform(settings, monkeypatch, serving="1")
    platform.champion = "2"
    calls = {"n": 0}

    def smoke(url, version, s, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the stable endpoint, after the switch
            raise rollout.SmokeTestFailed("serves version 1, expected 2")

    monkeypatch.setattr(rollout, "smoke_test", smoke)
    with pytest.raises(rollout.DeployFailed, match="serves version 1"):
        rollout.deploy("2", settings)
    switches = [key for name, key in platform.calls if name == "switch"]
    assert switches == ["2", "1"] and platform.stable.model_version == "1"
    assert platform.champion == "1" and platform.alerts


def test_rollback_goes_to_the_version_deployed_before(settings: Settings, monkeypatch):
    platform = FakePlatform(settings, monkeypatch, serving="1")
    rollout.deploy("2", settings)
    rollout.deploy("3", settings)
    result = rollout.rollback(settings)
    assert result.version == "2" and platform.stable.model_version == "2" and platform.champion == "2"
    assert rollout.rollback(settings, "1").version == "1"


def test_rollback_without_history_is_refused(settings: Settings, monkeypatch):
    FakePlatform(settings, monkeypatch, serving="1")
    with pytest.raises(rollout.DeployFailed, match="no earlier deployment"):
        rollout.rollback(settings)


def test_a_failed_gate_is_refused_unless_a_named_person_overrides_and_every_step_is_audited(
    settings: Settings, monkeypatch
):
    from medops.core import audit

    platform = FakePlatform(settings, monkeypatch, serving="1")
    platform.failed_gates = {"2"}
    with pytest.raises(rollout.DeployRefused, match="--override-by NAME --reason TEXT") as refused:
        rollout.deploy("2", settings, actor="tester")
    assert "gate did not pass (sensitivity lower bound 0.80)" in str(refused.value)
    assert platform.calls == [] and platform.stable.model_version == "1"
    with pytest.raises(rollout.DeployRefused):  # a placeholder names nobody
        rollout.deploy("2", settings, override_by="approver", override_reason="looks fine", actor="tester")
    with pytest.raises(rollout.DeployRefused):  # a name without a reason is not an override
        rollout.deploy("2", settings, override_by="dr.alvarez", override_reason=" ", actor="tester")

    result = rollout.deploy("2", settings, override_by="dr.alvarez", override_reason="site-d outbreak", actor="tester")
    assert result.version == "2" and platform.stable.model_version == "2"
    rollout.deploy("3", settings, actor="tester")
    back = rollout.rollback(settings, actor="tester")  # served before under an override: no new one needed
    assert back.version == "2"
    platform.fail_at = "prepare"
    with pytest.raises(rollout.DeployFailed):
        rollout.deploy("4", settings, actor="tester")

    entries = audit.entries(settings)
    assert [(e.action, e.actor, e.links["model_version"]) for e in entries] == [
        ("refusal", "tester", "2"),
        ("refusal", "tester", "2"),
        ("refusal", "tester", "2"),
        ("override", "dr.alvarez", "2"),
        ("deployment", "tester", "2"),
        ("deployment", "tester", "3"),
        ("rollback", "tester", "2"),
        ("rollback", "medops-scheduler", "2"),  # the failed deploy of 4 left 2 serving
    ]
    assert entries[3].reason == "site-d outbreak" and entries[3].details["entered_by"] == "tester"
    assert entries[6].reason == "rolled back from v3 to v2"
    assert platform.anchored == [(entry.seq, entry.links["model_version"]) for entry in entries]
    assert audit.verify(settings).ok


# the swap protocol --------------------------------------------------------------------------


def test_watcher_switches_and_acknowledges(tmp_path: Path):
    served = {"version": "1"}

    def switch(version: str) -> None:
        if version == "bad":
            raise ValueError("incompatible model")
        served["version"] = version

    watcher = control.ModelWatcher(tmp_path, lambda: served["version"], switch, interval=0.02)
    watcher.start()
    try:
        assert control.read_acks(tmp_path)[os.getpid()]["model_version"] == "1"
        control.request_model(tmp_path, "2")
        _wait(lambda: control.read_acks(tmp_path)[os.getpid()]["model_version"] == "2")
        assert served["version"] == "2" and control.read_acks(tmp_path)[os.getpid()]["error"] is None
        control.request_model(tmp_path, "bad")
        _wait(lambda: control.read_acks(tmp_path)[os.getpid()]["model_version"] == "bad")
        assert "incompatible model" in control.read_acks(tmp_path)[os.getpid()]["error"]
        assert served["version"] == "2"  # still serving what worked
    finally:
        watcher.stop()


def test_switch_waits_for_every_worker_and_reports_errors(settings: Settings, monkeypatch):
    record = fake_record(settings, rollout.STABLE, "1")
    monkeypatch.setattr(processes, "worker_pids", lambda r: [101, 102])
    monkeypatch.setattr(processes, "is_running", lambda r: True)
    started = time.monotonic()

    def acks(directory: Path) -> dict[int, dict[str, Any]]:
        wanted = control.requested_model(directory)
        answers = {101: {"pid": 101, "model_version": wanted, "error": None}}
        if wanted == "3":
            answers[102] = {"pid": 102, "model_version": wanted, "error": "ModuleNotFoundError: x"}
        elif time.monotonic() - started > 0.3:  # the second worker is slower
            answers[102] = {"pid": 102, "model_version": wanted, "error": None}
        return answers

    monkeypatch.setattr(control, "read_acks", acks)
    rollout.switch_stable(record, "2", settings, timeout=5)
    assert time.monotonic() - started >= 0.3 and record.model_version == "2"
    assert processes.read_record(settings, rollout.STABLE).model_version == "2"
    with pytest.raises(RuntimeError, match="could not load model version 3"):
        rollout.switch_stable(record, "3", settings, timeout=5)
    assert control.requested_model(rollout.control_dir(settings)) == "3"


def test_a_switch_left_half_done_by_a_killed_rollout_is_settled(settings: Settings, monkeypatch):
    """The workers were asked for a version the record does not name (tests/test_rollout_crashes.py)."""
    record = fake_record(settings, rollout.STABLE, "1")
    processes.write_record(settings, record)
    monkeypatch.setattr(processes, "worker_pids", lambda r: [101, 102])
    monkeypatch.setattr(processes, "is_running", lambda r: True)
    broken = {"3"}  # a version the workers cannot load

    def acks(directory: Path) -> dict[int, dict[str, Any]]:
        wanted = control.requested_model(directory)
        error = "ModuleNotFoundError: x" if wanted in broken else None
        return {pid: {"pid": pid, "model_version": wanted, "error": error} for pid in (101, 102)}

    monkeypatch.setattr(control, "read_acks", acks)
    control.request_model(rollout.control_dir(settings), "2")  # every worker took it: the record follows
    assert rollout._settle_switch(record, settings, timeout=5).model_version == "2"
    assert processes.read_record(settings, rollout.STABLE).model_version == "2"
    control.request_model(rollout.control_dir(settings), "3")  # refused: all asked back to the recorded one
    assert rollout._settle_switch(record, settings, timeout=5).model_version == "2"
    assert control.requested_model(rollout.control_dir(settings)) == "2"


def test_startup_failure_is_read_from_this_start_only(settings: Settings, tmp_path: Path):
    log = tmp_path / "candidate.log"
    log.write_text("old start\nValueError: earlier failure\nApplication startup failed. Exiting.\n")
    record = fake_record(settings, rollout.CANDIDATE, "2")
    record.log, record.log_offset = str(log), log.stat().st_size
    assert processes.startup_failure(record) is None
    with log.open("a") as handle:
        handle.write("Traceback...\nModuleNotFoundError: No module named 'x'\n[ERROR] Application startup failed.\n")
    assert processes.startup_failure(record) == "ModuleNotFoundError: No module named 'x'"


# stopping a circus-like process tree ---------------------------------------------------------

ARBITER = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    behave = sys.argv[1] == "graceful"
    children = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        for _ in range(2)
    ]
    def stop(*_):
        if behave:
            for child in children:
                child.terminate()
            for child in children:
                child.wait()
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while True:
        time.sleep(1)
    """
)


@pytest.mark.parametrize("behaviour", ["graceful", "leaves-children"])
def test_stop_server_leaves_no_process(settings: Settings, tmp_path: Path, behaviour: str):
    script = tmp_path / "arbiter.py"
    script.write_text(ARBITER)
    arbiter = subprocess.Popen(
        [sys.executable, str(script), behaviour], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert arbiter.stdout.readline().strip() == "ready"
    record = fake_record(settings, rollout.CANDIDATE, "2")
    record.pid, record.create_time = arbiter.pid, psutil.Process(arbiter.pid).create_time()
    processes.write_record(settings, record)
    workers = psutil.Process(arbiter.pid).children()
    assert len(workers) == 2 and all(os.getsid(w.pid) != os.getsid(arbiter.pid) for w in workers)
    processes.stop_server(record, settings, timeout=3)
    arbiter.wait(timeout=5)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert processes.read_record(settings, rollout.CANDIDATE) is None


def test_a_recycled_pid_is_not_signalled(settings: Settings):
    record = fake_record(settings, rollout.STABLE, "1")
    record.create_time -= 1000  # same pid, another process
    assert not processes.is_running(record)
    processes.stop_server(record, settings)  # must not signal this test process
    assert psutil.Process().is_running()


def _wait(condition, timeout: float = 5.0) -> None:
    def met() -> bool:
        try:
            return bool(condition())
        except (KeyError, OSError):  # the file is not there yet
            return False

    assert poll_until(met, timeout, 0.02), "condition not met in time"


# the deploy_model DAG -------------------------------------------------------------------------


def test_version_to_deploy_prefers_form_then_champion_then_event(settings: Settings, monkeypatch):
    from types import SimpleNamespace

    from medops.orchestration import CHAMPION, DATA

    monkeypatch.setattr(rollout, "_champion_version", lambda s: "7")
    champion, data = CHAMPION, DATA  # Airflow keys the events by these asset objects
    events = {
        champion: [SimpleNamespace(extra={"model_version": "4"}), SimpleNamespace(extra={"model_version": "5"})],
        data: [SimpleNamespace(extra={"model_version": "9"})],
    }
    assert rollout.version_to_deploy(settings, " 3 ", events) == "3"
    # v4 and v5 were promoted, then v7 (a concurrent training): serving v5 would pull @champion back
    assert rollout.version_to_deploy(settings, "", events) == "7"
    assert rollout.version_to_deploy(settings, None, {data: events[data]}) == "7"
    monkeypatch.setattr(rollout, "_champion_version", lambda s: None)
    assert rollout.version_to_deploy(settings, "", events) == "5"  # no alias: the latest promotion
    with pytest.raises(ValueError, match="no model version"):
        rollout.version_to_deploy(settings)


def _deploy_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(Path(__file__).resolve().parents[1] / "dags" / "deploy_model.py"))
    assert not bag.import_errors
    return bag.dags["deploy_model"]


@pytest.mark.parametrize(("conf", "expected"), [({"model_version": "2"}, "2"), ({}, "7")], ids=["manual", "champion"])
def test_deploy_model_dag_passes_the_version_through(airflow_db, settings: Settings, monkeypatch, conf, expected):
    import pipelines.model_registry

    calls: list[tuple[str, str | None]] = []
    monkeypatch.setattr(pipelines.model_registry, "champion_version", lambda s: "7")
    monkeypatch.setattr(rollout, "_gate_status", lambda version, s: (True, "passed"))

    def prepare(version: str, s: Settings, **kwargs: Any) -> rollout.PreparedBento:
        calls.append(("build", version))
        return rollout.PreparedBento(version, "m", f"b:{version}")

    monkeypatch.setattr(rollout, "prepare_bento", prepare)

    def deploy(version: str, s: Settings, *, bento: str | None = None, **kwargs: Any) -> rollout.DeployResult:
        calls.append(("deploy", f"{version}@{bento} seen {kwargs.get('champion_seen')}"))
        return rollout.DeployResult(version, "1", bento or "", "http://127.0.0.1:18999", "swap", 1.0)

    monkeypatch.setattr(rollout, "deploy", deploy)
    run = _deploy_dag().test(run_conf=conf)
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert str(run.state) == "success", states
    # Following @champion, the rollout is told what the alias named when it chose (a promotion since
    # then must stay); a version asked for on the form moves the alias to it.
    seen = None if conf else expected
    assert calls == [("build", expected), ("deploy", f"{expected}@b:{expected} seen {seen}")]


def test_deploy_model_dag_refuses_a_failed_gate_unless_a_named_person_overrides(
    airflow_db, settings: Settings, monkeypatch
):
    from medops.core import audit

    calls: list[str] = []
    monkeypatch.setattr(rollout, "_gate_status", lambda version, s: (False, "sensitivity lower bound 0.80 below 0.85"))
    monkeypatch.setattr(governance, "anchor", lambda entry, s, model_version: None)
    monkeypatch.setattr(
        rollout, "prepare_bento", lambda v, s, **k: calls.append("build") or rollout.PreparedBento(v, "m", "b")
    )

    def deploy(version: str, s: Settings, **kwargs: Any) -> rollout.DeployResult:
        calls.append("deploy")
        return rollout.DeployResult(version, "1", "b", "http://127.0.0.1:18999", "swap", 1.0)

    monkeypatch.setattr(rollout, "deploy", deploy)
    refused = _deploy_dag().test(run_conf={"model_version": "2"})
    states = {ti.task_id: str(ti.state) for ti in refused.get_task_instances()}
    assert str(refused.state) == "failed" and states["choose_version"] == "failed", states
    assert calls == []  # nothing built, nothing served
    assert [e.action for e in audit.entries(settings)] == ["refusal"]  # refused for good, not retried
    assert "gate did not pass (sensitivity lower bound 0.80 below 0.85)" in audit.entries(settings)[0].reason

    allowed = _deploy_dag().test(
        run_conf={"model_version": "2", "override_by": "dr.alvarez", "override_reason": "site-d outbreak, reviewed"}
    )
    assert str(allowed.state) == "success"
    assert calls == ["build", "deploy"]
    override = audit.entries(settings)[-1]
    assert (override.action, override.actor, override.reason) == ("override", "dr.alvarez", "site-d outbreak, reviewed")
    assert override.links["model_version"] == "2" and override.details["entered_by"] == "dag_test"
    assert audit.verify(settings).ok
