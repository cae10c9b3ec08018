"""The audit trail: append-only, hash-chained, durable, private; verify names the first altered entry."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from medops.core import audit
from medops.core.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def _fill(settings: Settings, count: int = 5) -> list[audit.AuditEntry]:
    actions = ["data_version", "training_run", "gate_decision", "approval", "promotion", "deployment"]
    return [
        audit.append(
            actions[i % len(actions)],
            actor="airflow:train_model" if i % 2 else "dr.jones",
            reason=f"step {i + 1}",
            links={"run_id": f"run-{i}", "data_version": "data-v1", "model_version": None},
            details={"figures": {"sensitivity_lower": 0.927}, "i": i},
            settings=settings,
        )
        for i in range(count)
    ]


def _lines(settings: Settings) -> list[dict]:
    return [json.loads(line) for line in audit.audit_path(settings).read_text().splitlines()]


def _rewrite(settings: Settings, records: list[dict | str]) -> None:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    audit.audit_path(settings).write_text(text)


def _rehash(record: dict) -> dict:
    record = {k: v for k, v in record.items() if k != "hash"}
    return record | {"hash": audit.entry_hash(record)}


def test_appended_entries_form_a_chain_and_verify(medops_home: Settings):
    written = _fill(medops_home)
    assert [e.seq for e in written] == [1, 2, 3, 4, 5]
    assert written[0].prev_hash == audit.GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(written, written[1:], strict=False))
    assert all(e.hash == e.computed_hash() for e in written)
    assert audit.entries(medops_home) == written
    assert written[0].links == {"run_id": "run-0", "data_version": "data-v1"}  # None links left out
    assert written[0].time.endswith("+00:00")
    result = audit.verify(medops_home)
    assert result.ok and result.entries == 5 and result.first_bad_seq is None
    assert (result.head_seq, result.head_hash) == (5, written[-1].hash)


def test_the_log_is_private_to_its_owner(medops_home: Settings):
    previous = os.umask(0)  # even a permissive umask must not widen the modes
    try:
        _fill(medops_home, 2)
    finally:
        os.umask(previous)
    directory = audit.audit_dir(medops_home)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in (audit.AUDIT_FILE, audit.HEAD_FILE, audit.LOCK_FILE):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("time", "2020-01-01T00:00:00+00:00"),
        ("actor", "someone-else"),
        ("action", "override"),
        ("reason", "nothing to see"),
        ("links", {"run_id": "other"}),
        ("details", {"figures": {"sensitivity_lower": 0.99}, "i": 2}),
        ("prev_hash", "1" * 64),
        ("hash", "2" * 64),
        ("seq", 9),
    ],
)
def test_editing_any_field_of_any_entry_is_caught_at_that_entry(medops_home: Settings, field: str, value):
    _fill(medops_home)
    for target in range(5):
        records = _lines(medops_home)
        original = list(records)
        records[target] = records[target] | {field: value}
        _rewrite(medops_home, records)
        result = audit.verify(medops_home)
        assert not result.ok and result.first_bad_seq == target + 1, (field, target, result)
        _rewrite(medops_home, original)
        assert audit.verify(medops_home).ok


def test_an_edit_with_a_recomputed_hash_is_caught_by_the_next_entry(medops_home: Settings):
    _fill(medops_home)
    records = _lines(medops_home)
    records[1] = _rehash(records[1] | {"actor": "forger"})
    _rewrite(medops_home, records)
    result = audit.verify(medops_home)
    assert (result.ok, result.first_bad_seq) == (False, 2)
    assert "seq 2 was rewritten" in result.problem


def test_an_edit_of_the_last_entry_with_a_recomputed_hash_is_caught_by_the_head(medops_home: Settings):
    _fill(medops_home)
    records = _lines(medops_home)
    records[-1] = _rehash(records[-1] | {"reason": "forged"})
    _rewrite(medops_home, records)
    result = audit.verify(medops_home)
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert "head record" in result.problem


@pytest.mark.parametrize("removed", [0, 1, 2, 3])
def test_removing_an_entry_is_caught_and_named(medops_home: Settings, removed: int):
    _fill(medops_home)
    records = _lines(medops_home)
    del records[removed]
    _rewrite(medops_home, records)
    result = audit.verify(medops_home)
    assert (result.ok, result.first_bad_seq) == (False, removed + 1)
    assert "removed" in result.problem


def test_truncating_the_tail_is_caught(medops_home: Settings):
    _fill(medops_home)
    _rewrite(medops_home, _lines(medops_home)[:3])
    result = audit.verify(medops_home)
    assert (result.ok, result.first_bad_seq) == (False, 4)
    assert "truncated" in result.problem
    audit.audit_path(medops_home).unlink()
    assert audit.verify(medops_home).first_bad_seq == 1


@pytest.mark.parametrize(("first", "second"), [(0, 1), (1, 3), (3, 4)])
def test_reordering_entries_is_caught_at_the_first_moved_one(medops_home: Settings, first: int, second: int):
    _fill(medops_home)
    records = _lines(medops_home)
    records[first], records[second] = records[second], records[first]
    _rewrite(medops_home, records)
    result = audit.verify(medops_home)
    assert (result.ok, result.first_bad_seq) == (False, first + 1)
    assert "reordered" in result.problem


@pytest.mark.parametrize("after", [0, 1, 2, 3])
def test_inserting_a_well_formed_entry_is_caught_at_the_insertion(medops_home: Settings, after: int):
    """The forger knows the format: the inserted entry has the right seq, link and hash."""
    _fill(medops_home)
    records = _lines(medops_home)
    forged = _rehash(records[after] | {"seq": after + 2, "prev_hash": records[after]["hash"], "reason": "forged"})
    records.insert(after + 1, forged)
    _rewrite(medops_home, records)
    result = audit.verify(medops_home)
    assert (result.ok, result.first_bad_seq) == (False, after + 2)
    assert "inserted" in result.problem


def test_inserting_a_hand_written_line_is_caught_at_that_line(medops_home: Settings):
    _fill(medops_home)
    records: list[dict | str] = list(_lines(medops_home))
    records.insert(2, '{"seq": 3, "actor": "me"}')
    _rewrite(medops_home, records)
    result = audit.verify(medops_home)
    assert (result.ok, result.first_bad_seq) == (False, 3)
    with pytest.raises(audit.AuditError, match="line 3"):
        audit.entries(medops_home)


def test_a_chain_rebuilt_to_the_end_is_caught_against_anchors_kept_elsewhere(medops_home: Settings):
    written = _fill(medops_home)
    anchors = {e.seq: e.hash for e in written}  # e.g. the hashes tagged on MLflow versions
    records = _lines(medops_home)
    previous = records[0]["hash"]
    for index in range(1, 5):  # rewrite seq 2 and rebuild every later link and the head
        records[index] = _rehash(records[index] | {"prev_hash": previous} | ({"actor": "forger"} if index == 1 else {}))
        previous = records[index]["hash"]
    _rewrite(medops_home, records)
    head = audit.audit_dir(medops_home) / audit.HEAD_FILE
    head.write_text(json.dumps({"seq": 5, "hash": previous}))
    assert audit.verify(medops_home).ok  # the documented limit of a chain on its own
    result = audit.verify(medops_home, anchors=anchors)
    assert (result.ok, result.first_bad_seq) == (False, 2)


def test_an_interrupted_write_is_reported_and_nothing_is_chained_onto_it(medops_home: Settings):
    _fill(medops_home, 3)
    path = audit.audit_path(medops_home)
    with path.open("ab") as handle:
        handle.write(b'{"seq": 4, "time": "2026')
    result = audit.verify(medops_home)
    assert (result.ok, result.first_bad_seq) == (False, 4)
    with pytest.raises(audit.AuditError, match="incomplete"):
        audit.append("rollback", actor="ops", reason="after crash", settings=medops_home)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"actor": "approver"}, "names nobody"),
        ({"actor": "  "}, "names nobody"),
        ({"action": "coffee_break"}, "unknown action"),
        ({"details": {"auc": float("nan")}}, "details: must be plain JSON"),
        ({"details": {"when": object()}}, "details: must be plain JSON"),
    ],
)
def test_bad_entries_are_refused_and_nothing_is_written(medops_home: Settings, kwargs: dict, message: str):
    _fill(medops_home, 1)
    arguments = {"action": "approval", "actor": "dr.jones", "reason": "ok"} | kwargs
    action = arguments.pop("action")
    with pytest.raises(ValueError, match=message):
        audit.append(action, settings=medops_home, **arguments)
    assert len(audit.entries(medops_home)) == 1 and audit.verify(medops_home).ok


def test_concurrent_appends_from_two_processes_keep_one_valid_chain(medops_home: Settings):
    script = (
        "import sys\n"
        "from medops.core import audit\n"
        "from medops.core.settings import Settings\n"
        "settings = Settings(home=sys.argv[1])\n"
        "for i in range(40):\n"
        "    audit.append('training_run', actor=sys.argv[2], reason=str(i), settings=settings)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    workers = [
        subprocess.Popen([sys.executable, "-c", script, str(medops_home.home), name], env=env)
        for name in ("worker-a", "worker-b")
    ]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    result = audit.verify(medops_home)
    assert result.ok and result.entries == 80, result
    written = audit.entries(medops_home)
    assert [e.seq for e in written] == list(range(1, 81))
    for name in ("worker-a", "worker-b"):
        assert [e.reason for e in written if e.actor == name] == [str(i) for i in range(40)]
