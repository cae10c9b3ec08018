"""DAG parsing: each DAG file's parse time as Airflow's DAG processor parses it, beyond an empty DAG.

Airflow 3's DAG processor keeps a manager process with Airflow imported (and, by default, the
``airflow.*`` modules every DAG file imports, ``parsing_pre_import_modules``) and forks a child
per file that runs ``airflow.dag_processing.processor._parse_file``: the stability check,
``BundleDagBag`` (importing the file) and serialization. This section does the same: a parent
with Airflow and the pre-imports loaded forks one child per measurement, which times
``_parse_file`` on one file. The baseline is a DAG file with one empty DAG parsed the same way;
medops's figure is the difference (what the file adds beyond Airflow itself). A second file with
a single TaskFlow ``@task`` shows how much of that difference is Airflow's own TaskFlow machinery
(``from airflow.sdk import task`` imports the decorators lazily, in every parsing child).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, SectionResult, fmt, in_fresh_fork, median, ratio, run_json_child

DAGS = REPO_ROOT / "dags"
GOAL_SECONDS = 0.1
EMPTY_DAG = '''"""An empty DAG: the parse-time baseline."""

from datetime import datetime

from airflow.sdk import dag


@dag(dag_id="bench_empty", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, tags=["bench"])
def bench_empty():
    pass


bench_empty()
'''
TASKFLOW_DAG = '''"""One TaskFlow task and nothing else: what Airflow's @task machinery costs a DAG file by itself."""

from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="bench_taskflow", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, tags=["bench"])
def bench_taskflow():
    @task
    def nothing() -> None:
        pass

    nothing()


bench_taskflow()
'''


def _parse(path: str, bundle: str, profile_name: str | None = None) -> dict[str, Any]:
    """Time ``_parse_file`` on one file (run in a fork of the prepared parent)."""
    import structlog
    from airflow.dag_processing.processor import DagFileParseRequest, _parse_file

    request = DagFileParseRequest(file=path, bundle_path=Path(bundle), bundle_name="dags-folder", callback_requests=[])
    log = structlog.get_logger(logger_name="bench")
    profiler = None
    if profile_name:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
    started = time.perf_counter()
    result = _parse_file(request, log)
    seconds = time.perf_counter() - started
    found: dict[str, Any] = {
        "seconds": seconds,
        "dag_ids": [dag.dag_id for dag in result.serialized_dags] if result else [],
        "import_errors": {str(k): str(v)[-300:] for k, v in (result.import_errors or {}).items()} if result else {},
    }
    if profiler is not None:
        from bench.profiling import hot_spots, save

        session = profiler.stop()
        found["profile"] = {"hot_spots": hot_spots(session, top=10), "files": save(session, profile_name)}
    return found


def _prepare_parent(files: list[Path]) -> None:
    """What the DAG processor's manager has loaded before it forks: Airflow and the pre-imports."""
    import logging

    import structlog
    from airflow.dag_processing.processor import _pre_import_airflow_modules

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    log = structlog.get_logger(logger_name="bench")
    for path in files:
        _pre_import_airflow_modules(str(path), log)


def run(quick: bool = False, runs: int = 3, profile: bool = False) -> SectionResult:
    section = SectionResult("dag_parsing")
    files = sorted(p for p in DAGS.glob("*.py") if not p.name.startswith("_"))
    section.params = {
        "files": [p.name for p in files],
        "runs": runs,
        "method": "fork + _parse_file",
        "dont_write_bytecode": bool(sys.flags.dont_write_bytecode),
    }
    with tempfile.TemporaryDirectory(prefix="medops-bench-dags-") as tmp:
        folder = Path(tmp) / "dags"  # alone in their bundle folder, as DAG files are
        folder.mkdir()
        (folder / "bench_empty.py").write_text(EMPTY_DAG)
        (folder / "bench_taskflow.py").write_text(TASKFLOW_DAG)
        env = {
            "AIRFLOW_HOME": str(Path(tmp) / "airflow"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        }
        args = ["measure", str(folder), "--runs", str(runs)]
        variants = {"as configured": run_json_child("bench.dag_parsing", args, 600, env)}
        if sys.flags.dont_write_bytecode:
            # PYTHONDONTWRITEBYTECODE is set and the venv holds few .pyc files (uv installs without
            # compiling), so every parsing child compiles the lazily imported sources again. The same
            # measurement with a bytecode cache in a private directory (the venv is left untouched),
            # filled by a first pass, shows what a default Python or a --compile-bytecode venv does.
            cached = env | {"PYTHONPYCACHEPREFIX": str(Path(tmp) / "pycache"), "PYTHONDONTWRITEBYTECODE": ""}
            run_json_child("bench.dag_parsing", ["measure", str(folder), "--runs", "1"], 600, cached)
            variants["bytecode cached"] = run_json_child("bench.dag_parsing", args, 600, cached)
            section.notes.append(
                "PYTHONDONTWRITEBYTECODE is set here, so 'as configured' compiles lazily imported sources in "
                "every parse; 'bytecode cached' is the same parse with a warm bytecode cache"
            )
        section.data["runs"] = variants
        slow = []
        for variant, measured in variants.items():
            slow += _rows_and_goals(section, variant, measured, files, len(variants) > 1)
        if slow and profile:
            section.data["profile"] = run_json_child(
                "bench.dag_parsing", ["measure", str(folder), "--runs", "1", "--profile"], 600, env
            )
    return section


def _measure(folder: Path, runs: int, profile: bool) -> dict[str, Any]:
    """The child: prepare like the DAG processor's manager, then parse every file ``runs`` times, one fork each."""
    files = sorted(p for p in DAGS.glob("*.py") if not p.name.startswith("_"))
    baselines = [folder / "bench_empty.py", folder / "bench_taskflow.py"]
    _prepare_parent([*files, *baselines])
    measured: dict[str, list[dict[str, Any]]] = {p.name: [] for p in [*baselines, *files]}
    for _ in range(runs):
        for path in [*baselines, *files]:  # the baselines in every round, interleaved with the files
            name = f"dag-parse-{path.stem}" if profile else None
            measured[path.name].append(in_fresh_fork(_parse, str(path), str(path.parent), name, timeout=120))
    return measured


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    measure = sub.add_parser("measure")
    measure.add_argument("folder", type=Path)
    measure.add_argument("--runs", type=int, default=3)
    measure.add_argument("--profile", action="store_true")
    options = parser.parse_args(argv)
    print(json.dumps(_measure(options.folder, options.runs, options.profile)))
    return 0


def _rows_and_goals(
    section: SectionResult, variant: str, measured: dict[str, list[dict[str, Any]]], files: list[Path], named: bool
) -> list[Path]:
    suffix = f" ({variant})" if named else ""
    baseline = median([r["seconds"] for r in measured["bench_empty.py"]])
    with_task = median([r["seconds"] for r in measured["bench_taskflow.py"]])
    section.row(
        f"one @task, no medops code{suffix}",
        "parse time beyond an empty DAG",
        fmt(None if with_task is None or baseline is None else with_task - baseline, " s"),
        f"{fmt(with_task, ' s')} total, empty {fmt(baseline, ' s')}",
        ratio(with_task, baseline),
        "empty DAG file",
        lower_is_better=True,
    )
    slow = []
    for path in files:
        results = measured[path.name]
        seconds = median([r["seconds"] for r in results])
        beyond = None if seconds is None or baseline is None else seconds - baseline
        errors = results[-1]["import_errors"]
        met = beyond is not None and beyond <= GOAL_SECONDS and not errors
        section.row(
            f"{path.name}{suffix}",
            "parse time beyond an empty DAG",
            fmt(beyond, " s"),
            f"{fmt(seconds, ' s')} total, empty {fmt(baseline, ' s')}",
            ratio(seconds, baseline),
            "empty DAG file",
            f"<= {GOAL_SECONDS} s",
            met,
            lower_is_better=True,
        )
        section.goal(
            f"parse {path.name}{suffix}",
            f"<= {GOAL_SECONDS} s beyond an empty DAG",
            fmt(beyond, " s") + (f" (import errors: {list(errors)})" if errors else ""),
            met,
        )
        if not met:
            slow.append(path)
    return slow


if __name__ == "__main__":
    sys.exit(main())
