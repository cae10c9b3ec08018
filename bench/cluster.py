"""Scaling out: the loop and the model search in the cluster profile with 1, 2 and 3 Celery train workers,
beside the standalone profile measured in the same run (the baseline of every ratio).

For each profile: a temporary MEDOPS_HOME on free loopback ports (and, for the cluster, databases
with a prefix of this run's own and a Redis database of its own, dropped and flushed after),
``medops.app.platform.up`` as ``medops up`` runs it, then one steady-state loop as the loop section
measures it (:func:`bench.loop._one_loop`: a 200-row batch lands -> the new champion answers).
Figures per profile:

- the *seed loop*: the ingest_data run ``up`` triggers (queued) -> the first champion serving,
  on a platform that has just started (its first task processes included);
- the *steady loop*: a batch landing -> the new champion answering, the platform warm;
- in each loop's train_model run: the run's wall time (start -> end) and the model search's span
  (first mapped ``search`` task started -> last one ended: three families, one task each).

Every platform shares the machine's cores with whatever else runs (each profile's load average at
its start is in the results): on the 2-core reference machine the workers add task slots, not
CPU. The search span over its longest task says whether the fan-out ran side by side, whatever
the load.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import SectionResult, fmt, free_port, medops_home

PROFILES = (("standalone", 0), ("cluster", 1), ("cluster", 2), ("cluster", 3))
REDIS_DB = 13  # Celery's queues of this section only; flushed before and after each platform
UP_TIMEOUT = 1200


def run(quick: bool = False, runs: int = 1) -> SectionResult:
    section = SectionResult("cluster")
    section.params = {"profiles": [_label(p, w) for p, w in PROFILES], "loops_per_profile": 1, "batch_rows": 200}
    measured = {}
    for profile, workers in PROFILES:
        label = _label(profile, workers)
        try:
            measured[label] = _measure(profile, workers)
        except Exception as error:  # one profile failing still leaves the others' figures
            measured[label] = {"error": f"{type(error).__name__}: {error}"}
        section.data[label] = measured[label]
    _rows(section, measured)
    return section


def _label(profile: str, workers: int) -> str:
    return profile if profile == "standalone" else f"cluster, {workers} worker{'s' if workers > 1 else ''}"


def _measure(profile: str, workers: int) -> dict[str, Any]:
    """Start one platform, measure its seed loop and one steady loop, stop it, drop what it made."""
    import os

    import redis
    from rich.console import Console

    from bench import loop
    from medops.app import cluster, platform
    from medops.core import processes
    from pipelines import model_registry

    ports = {name: free_port() for name in ("AIRFLOW", "SERVING", "MLFLOW", "EVIDENTLY", "WEBDAV", "REGISTRY")}
    env = {f"MEDOPS_{name}_PORT": str(port) for name, port in ports.items()} | {
        "MEDOPS_API_KEYS": loop.API_KEY,
        "MEDOPS_PROFILE": profile,
        "MEDOPS_CLUSTER_WORKERS": str(max(workers, 1)),
        "MEDOPS_CLUSTER_DB_PREFIX": f"medops_bench_{os.getpid()}_{workers}",
        "MEDOPS_REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
    }
    broker = redis.Redis.from_url(env["MEDOPS_REDIS_URL"])
    quiet = Console(quiet=True)
    with medops_home(f"cluster-{workers}", **env) as settings:
        if profile == "cluster":
            cluster.drop_databases(settings)
            broker.flushdb()
        try:
            started = time.time()
            load = [round(value, 2) for value in os.getloadavg()]
            platform.up(settings, console=quiet, out=quiet, timeout=UP_TIMEOUT)
            serving_at = time.time()
            client = platform.airflow_client(settings)
            loop._quiet_monitoring(client)
            seed_runs = loop._loop_runs(client, started)
            figures = {
                "load_average_at_start": load,
                "up_seconds": round(serving_at - started, 1),
                "seed_loop_seconds": round(serving_at - seed_runs["ingest_data"].queued_at.timestamp(), 1),
                "seed_training": _training(client, seed_runs["train_model"].dag_run_id),
            }
            steady = loop._one_loop(0, settings, client, model_registry)
            if not steady["ok"]:
                raise RuntimeError(f"the steady loop failed: {steady['reason']}")
            figures["steady_loop_seconds"] = round(steady["total_seconds"], 1)
            figures["steady_training"] = _training(client, steady["runs"]["train_model"]["dag_run_id"])
            client.close()
            return figures
        finally:
            platform.down(settings, console=quiet)
            loop._stop_leftovers(settings.home, processes)
            if profile == "cluster":
                cluster.drop_databases(settings)
                broker.flushdb()


def _training(client: Any, run_id: str) -> dict[str, Any]:
    """A train_model run's wall time and its mapped search tasks' span and durations."""
    run = client.wait_for_run("train_model", run_id, timeout=600)
    searches = [ti for ti in client.task_instances("train_model", run_id) if ti.task_id == "search"]
    start = min(ti.start_date for ti in searches)
    end = max(ti.end_date for ti in searches)
    return {
        "run_seconds": round((run.end_date - run.start_date).total_seconds(), 1),
        "search_span_seconds": round((end - start).total_seconds(), 1),
        "search_task_seconds": [round(ti.duration or 0.0, 1) for ti in sorted(searches, key=lambda t: t.map_index)],
    }


def _rows(section: SectionResult, measured: dict[str, dict[str, Any]]) -> None:
    figures = (
        ("seed landing -> champion serving (platform just up)", lambda m: m["seed_loop_seconds"]),
        ("batch landing -> new champion serving (warm)", lambda m: m["steady_loop_seconds"]),
        ("train_model run, start -> end (warm loop)", lambda m: m["steady_training"]["run_seconds"]),
        ("model search: mapped search tasks' span (warm loop)", lambda m: m["steady_training"]["search_span_seconds"]),
        ("model search: mapped search tasks' span (seed loop)", lambda m: m["seed_training"]["search_span_seconds"]),
    )
    # The span over the longest search task: 1.0 when the three ran side by side, ~2 when two slots
    # made one wait. Unlike the seconds above, it does not move with what else loads the machine.
    overlap = "model search: span / longest search task (warm loop; 1.0 = side by side)"
    base = measured.get("standalone", {})
    for label, values in measured.items():
        if "error" in values:
            section.notes.append(f"{label}: {values['error']}")
            continue
        for metric, value_of in figures:
            value = value_of(values)
            baseline = value_of(base) if "error" not in base and base else None
            section.row(
                label,
                metric,
                fmt(value, " s"),
                fmt(baseline, " s") if baseline is not None else None,
                value / baseline if baseline else None,
                "standalone",
                lower_is_better=True,
            )
        training = values["steady_training"]
        section.row(label, overlap, f"{training['search_span_seconds'] / max(training['search_task_seconds']):.2f}")
    failed = [label for label, values in measured.items() if "error" in values]
    if failed:
        section.status, section.reason = "failed", f"no figures for {', '.join(failed)}"
