"""The benchmark harness keeps working: ``python -m bench --quick`` runs and writes well-formed results.

No timing is asserted (benchmarks are not tests). The run gets its own TMPDIR, so that afterwards
no process may still be running from it: the harness must stop everything it started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (
                marker.encode() in (entry / "cmdline").read_bytes()
                or marker.encode() in (entry / "environ").read_bytes()
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.integration
def test_quick_bench_writes_well_formed_results(tmp_path: Path):
    out = tmp_path / "latest.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDOPS_", "AIRFLOW"))}
    env["TMPDIR"] = str(scratch)
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    results = json.loads(out.read_text())
    assert results["schema"] == "medops-bench/1" and results["quick"] is True
    machine = results["machine"]
    assert machine["cores"] >= 1 and machine["ram_gib"] > 0 and machine["cpu_model"]
    assert set(results["sections"]) == {"dag_parsing", "ingest", "drift", "serving"}
    for name, section in results["sections"].items():
        assert section["status"] == "ok", (name, section["reason"])
        assert section["rows"], name
        for row in section["rows"]:
            assert {"case", "metric", "medops", "baseline", "ratio", "goal", "met"} <= set(row)
            assert row["met"] in (True, False, None)
        assert all(goal["met"] in (True, False, None) for goal in section["goals"])
    assert results["goals"] and all(goal["section"] in results["sections"] for goal in results["goals"])
    assert "medops / baseline" in completed.stdout  # the printed table

    from bench.report import render_markdown

    markdown = render_markdown(results)
    assert "| section |" in markdown and machine["cpu_model"] in markdown

    assert _processes_mentioning(str(scratch)) == [], "the benchmark left processes running"
