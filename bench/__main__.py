"""``python -m bench`` (``make bench``): run every benchmark section, write results/latest.json, print the table.

Each section runs in its own child process (``python -m bench --section NAME``), so a section's
imports, memory and module state never leak into another's figures, and a section that fails or
runs out of time is reported as such while the others still run. A section stops whatever it
started (servers, Airflow) in ``finally`` blocks; on a timeout the runner sends
SIGTERM first (the section cleans up), then SIGKILL.

``--quick`` is the harness check CI runs (``tests/test_bench_smoke.py``): tiny sizes, short
durations, one run each, and no loop section unless asked for (it needs Airflow).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, RESULTS_DIR, SectionResult, child_env, git_sha, machine_info

SECTIONS = ("dag_parsing", "ingest", "drift", "monitoring", "serving", "loop", "cluster")
# cluster starts four platforms one after the other (30-60 min here): only when asked for by name
DEFAULT_SECTIONS = SECTIONS[:-1]
QUICK_SECTIONS = ("dag_parsing", "ingest", "drift", "serving")
# make bench must finish within 15 minutes on the 2-core reference machine: the loop section,
# which runs last, measures as many loops as the rest of this budget allows (up to --runs).
FULL_BUDGET_SECONDS = 13.5 * 60
TIMEOUTS = {
    "dag_parsing": 300,
    "ingest": 900,
    "drift": 900,
    "monitoring": 900,
    "serving": 900,
    "loop": 1500,
    "cluster": 5400,
}


def run_section(name: str, quick: bool, runs: int, options: argparse.Namespace) -> SectionResult:
    """Run one section in this process (the child side of the runner)."""
    from bench.common import terminate_on_signals

    terminate_on_signals()
    started = time.monotonic()
    if name == "serving":
        from bench import serving

        result = serving.run(quick=quick, runs=runs, profile=options.profile)
    elif name == "drift":
        from bench import drift

        result = drift.run(
            quick=quick,
            runs=runs,
            plain_max_rows=options.plain_max_rows,
            profile=options.profile,
            read_log=options.drift_read_log,
        )
    elif name == "monitoring":
        from bench import monitoring_power

        result = monitoring_power.run(quick=quick, runs=runs)
    elif name == "loop":
        from bench import loop

        result = loop.run(quick=quick, runs=runs, budget_seconds=options.budget)
    elif name == "dag_parsing":
        from bench import dag_parsing

        result = dag_parsing.run(quick=quick, runs=runs, profile=options.profile)
    elif name == "cluster":
        from bench import cluster

        result = cluster.run(quick=quick, runs=runs)
    elif name == "ingest":
        from bench import ingest

        result = ingest.run(quick=quick, runs=runs, profile=options.profile)
    else:
        raise ValueError(f"unknown section {name}; choose from {', '.join(SECTIONS)}")
    result.seconds = time.monotonic() - started
    return result


def _child(name: str, options: argparse.Namespace, timeout: float, budget: float | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="medops-bench-") as tmp:
        out = Path(tmp) / "section.json"
        argv = [sys.executable, "-m", "bench", "--section", name, "--runs", str(options.runs), "--out", str(out)]
        if options.quick:
            argv.append("--quick")
        if options.profile:
            argv.append("--profile")
        if options.drift_read_log:
            argv.append("--drift-read-log")
        if options.plain_max_rows:
            argv += ["--plain-max-rows", str(options.plain_max_rows)]
        if budget:
            argv += ["--budget", f"{budget:.0f}"]
        started = time.monotonic()
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=child_env(), start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # the section's finally blocks stop its servers
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            return SectionResult(
                name, "failed", f"timed out after {timeout:.0f} s", time.monotonic() - started
            ).to_dict()
        except BaseException:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=120)
            raise
        if process.returncode != 0 or not out.exists():
            return SectionResult(
                name, "failed", f"exited with {process.returncode}; see the output above", time.monotonic() - started
            ).to_dict()
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and short runs (the CI harness check)")
    parser.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--runs", type=int, default=None, help="measurements per figure (default 3, quick 1)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default bench/results/latest.json)")
    parser.add_argument(
        "--plain-max-rows",
        type=int,
        default=None,
        help="largest window plain Evidently runs on (default: all; above 100,000 rows it runs once, 50-100 s)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile (pyinstrument) what misses a goal; profiles go to bench/results/profiles/",
    )
    parser.add_argument(
        "--drift-read-log",
        action="store_true",
        help="also time read_predictions of the largest drift window as a CSV log",
    )
    parser.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.out_given = options.out is not None
    options.out = options.out or RESULTS_DIR / "latest.json"
    options.runs = options.runs or (1 if options.quick else 3)

    if options.section:  # child side: one section's JSON to --out (never over latest.json), else stdout
        result = json.dumps(run_section(options.section, options.quick, options.runs, options).to_dict(), default=str)
        if options.out_given:
            options.out.write_text(result)
        else:
            print(result)
        return 0

    names = (
        options.sections.split(",") if options.sections else list(QUICK_SECTIONS if options.quick else DEFAULT_SECTIONS)
    )
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    started = time.monotonic()
    results: dict[str, Any] = {
        "schema": "medops-bench/1",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": options.quick,
        "runs": options.runs,
        "git_sha": git_sha(),
        "machine": machine_info(),
        "sections": {},
    }
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        budget = None
        if name == "loop" and not options.quick:
            budget = max(60.0, FULL_BUDGET_SECONDS - (time.monotonic() - started))
        results["sections"][name] = _child(name, options, TIMEOUTS[name], budget)
        section = results["sections"][name]
        print(
            f"[bench] {name}: {section['status']} in {section['seconds']:.0f} s {section.get('reason', '')}",
            file=sys.stderr,
            flush=True,
        )
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["seconds"] = round(time.monotonic() - started, 1)
    results["goals"] = [goal for section in results["sections"].values() for goal in section.get("goals", [])]
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(results, indent=1, default=str) + "\n")

    from bench.report import render_text

    print(render_text(results))
    print(f"\nresults: {options.out}  (markdown for the README: python -m bench.report)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
