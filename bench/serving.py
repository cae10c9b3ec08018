"""Serving: medops ``/predict`` against a plain FastAPI app with the same model, and a constant ASGI app.

Three servers on loopback, one worker process each, all running for the whole section:

- ``medops``: the champion served the production way (``serving.rollout.serve``: Bento build,
  ``bentoml serve``), bearer auth, validation and the prediction log all on;
- ``fastapi``: :mod:`bench.apps.fastapi_baseline` under uvicorn (the same MLflow model version);
- ``ceiling``: :mod:`bench.apps.raw_asgi` under uvicorn, a constant answer.

Then the cost of durable-before-answer logging: the same Bento served a second time with
``MEDOPS_PREDICTION_LOG_DURABLE=false`` (answers leave before their prediction-log rows are fsynced;
a baseline only, never a production setting), both measured at :data:`DURABILITY_CONNECTIONS`
connections with 1-record bodies, in alternating rounds; p50/p99 of each and their ratio.

Load comes from another process (wrk, or :mod:`bench.load` without it) at a fixed concurrency,
with 1-record and 100-record bodies. Each measurement runs ``seconds``; rounds are interleaved
(every round measures every server and body, the server order rotating) so that the machine's
noise hits all of them alike, and the table shows medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import fixtures
from bench.common import (
    HOST,
    SectionResult,
    child_env,
    fmt,
    free_port,
    http_ready,
    median,
    medops_home,
    ratio,
    start_process,
    stop_process,
)
from bench.load import ensure_wrk, run_python, run_wrk
from medops.core.processes import is_running, wait_until

API_KEY = "bench-serving-key"
# One key drives all the load on purpose: the per-key rate and concurrency limits would measure
# themselves, not the service, so they are switched off here (0 = no limit).
NO_KEY_LIMITS = {"MEDOPS_API_KEYS": API_KEY, "MEDOPS_RATE_LIMIT_PER_SECOND": "0", "MEDOPS_CONCURRENCY_LIMIT": "0"}
TARGETS = ("medops", "fastapi", "ceiling")
# The training benchmarks use: the full search (three families) picks logistic regression on the
# seed data; training only that family gives the same model in a fraction of the time.
FAMILIES = ["logistic_regression"]
DURABILITY_CONNECTIONS = 8
DURABILITY_REQUESTS = 400  # per round with the Python load generator (wrk runs for a time instead)


def _uvicorn(module: str, port: int, log: Path, env: dict[str, str]):
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        module,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    return start_process(argv, env=child_env(env), log=log)


def _check_answers(urls: dict[str, str], body: bytes) -> dict[str, Any]:
    """medops and the baseline must serve the same model: same probabilities for the same records."""
    import httpx

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    got = {}
    for name in ("medops", "fastapi"):
        response = httpx.post(f"{urls[name]}/predict", content=body, headers=headers, timeout=30)
        response.raise_for_status()
        got[name] = [p["probability_malignant"] for p in response.json()["predictions"]]
    gap = max(abs(a - b) for a, b in zip(got["medops"], got["fastapi"], strict=True))
    if gap > 1e-9:
        raise RuntimeError(f"medops and the FastAPI baseline disagree by {gap:.3g}: not the same model")
    return {"max_probability_gap": gap}


def run(quick: bool = False, runs: int = 3, profile: bool = False) -> SectionResult:
    section = SectionResult("serving")
    seconds = 1.0 if quick else 4.0
    warmup = 1.0
    connections = 16
    bodies = (1, 100)
    wrk = ensure_wrk()
    tool = "wrk" if wrk else "python"
    section.params = {
        "tool": f"wrk (1 thread, {connections} connections)" if wrk else f"python bench.load ({connections} conns)",
        "connections": connections,
        "seconds_per_run": seconds,
        "warmup_seconds": warmup,
        "runs": runs,
        "bodies_records": list(bodies),
        "workers_per_server": 1,
        "model_families": FAMILIES,
    }
    if not wrk:
        section.notes.append("wrk not found and not installable here: the Python load generator was used")
    port = free_port()
    with (
        medops_home("serving", **NO_KEY_LIMITS, MEDOPS_SERVING_PORT=str(port), MEDOPS_SERVING_WORKERS="1") as settings,
        tempfile.TemporaryDirectory(prefix="medops-bench-bodies-") as tmp,
    ):
        from serving import rollout

        started = time.monotonic()
        version = fixtures.train_champion(settings, FAMILIES)
        section.data["setup_train_seconds"] = round(time.monotonic() - started, 1)
        body_files = {}
        for n in bodies:
            body_files[n] = Path(tmp) / f"body-{n}.json"
            body_files[n].write_bytes(fixtures.request_body(n))
        env = {"BENCH_MODEL_VERSION": version}
        ports = {"fastapi": free_port(), "ceiling": free_port()}
        processes = {}
        try:
            processes["fastapi"] = _uvicorn(
                "bench.apps.fastapi_baseline:app", ports["fastapi"], settings.home / "fastapi.log", env
            )
            processes["ceiling"] = _uvicorn(
                "bench.apps.raw_asgi:app", ports["ceiling"], settings.home / "ceiling.log", env
            )
            started = time.monotonic()
            record = rollout.serve(settings, version)
            section.data["setup_bento_build_and_start_seconds"] = round(time.monotonic() - started, 1)
            urls = {"medops": record.url, **{k: f"http://{HOST}:{p}" for k, p in ports.items()}}
            for name in ("fastapi", "ceiling"):
                wait_until(
                    lambda n=name: http_ready(f"{urls[n]}/readyz"),
                    120,
                    f"{name} server",
                    alive=lambda n=name: is_running(processes[n]),
                )
            section.data.update(_check_answers(urls, body_files[1].read_bytes()))
            headers = {"Authorization": f"Bearer {API_KEY}"}

            def load(target: str, n: int, duration: float) -> dict[str, Any]:
                url = f"{urls[target]}/predict"
                if wrk:
                    result = run_wrk(
                        wrk, url, body_files[n], connections=connections, seconds=duration, headers=headers
                    )
                else:
                    result = run_python(url, body_files[n], connections=connections, seconds=duration, headers=headers)
                return result.to_dict()

            for target in TARGETS:
                for n in bodies:
                    load(target, n, warmup)
            measured: dict[str, list[dict[str, Any]]] = {f"{t}/{n}": [] for t in TARGETS for n in bodies}
            for round_ in range(runs):
                order = TARGETS[round_ % 3 :] + TARGETS[: round_ % 3]
                for n in bodies:
                    for target in order:
                        measured[f"{target}/{n}"].append(load(target, n, seconds))
            section.data["runs"] = measured
            section.data["prediction_log_rows"] = _log_rows(settings)
            durability = _durability_cost(settings, record, body_files[1], wrk, headers, runs, quick)
        finally:
            try:
                rollout.stop_serving(settings)
            finally:
                for process in processes.values():
                    stop_process(process)
        summary = _summarise(measured, bodies)
        section.data["medians"] = summary
        _rows_and_goals(section, summary, bodies, tool)
        _durability_rows(section, durability)
        if profile and not all(goal.met for goal in section.goals):
            section.data["profile"] = profile_service(settings, version, body_files, wrk, connections)
    return section


def _durability_cost(
    settings: Any, record: Any, body_file: Path, wrk: str | None, headers: dict[str, str], runs: int, quick: bool
) -> dict[str, Any]:
    """/predict latency of the served champion vs the same Bento answering before its log fsync."""
    from serving import processes

    unsynced = settings.model_copy(update={"prediction_log_durable": False})
    baseline = processes.start_server(
        unsynced, bento=record.bento, model_version=record.model_version, port=free_port(), role="bench-no-fsync"
    )
    try:
        processes.wait_ready(baseline, timeout=120)
        urls = {"durable": f"{record.url}/predict", "no_fsync": f"{baseline.url}/predict"}

        def load(url: str, seconds: float, requests: int) -> dict[str, Any]:
            if wrk:
                result = run_wrk(
                    wrk, url, body_file, connections=DURABILITY_CONNECTIONS, seconds=seconds, headers=headers
                )
            else:
                result = run_python(
                    url,
                    body_file,
                    connections=DURABILITY_CONNECTIONS,
                    seconds=seconds * 10,
                    headers=headers,
                    max_requests=requests,
                )
            return result.to_dict()

        requests = DURABILITY_REQUESTS // (4 if quick else 1)
        for url in urls.values():
            load(url, 1.0, requests // 4)  # warm-up
        measured: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
        for round_ in range(runs):
            for name in sorted(urls, reverse=bool(round_ % 2)):
                measured[name].append(load(urls[name], 1.0 if quick else 2.0, requests))
    finally:
        processes.stop_server(baseline, settings)
    return {
        name: {
            "p50_ms": median([r["p50_ms"] for r in rounds]),
            "p99_ms": median([r["p99_ms"] for r in rounds]),
            "errors": sum(r["errors"] for r in rounds),
            "requests": sum(r["requests"] for r in rounds),
        }
        for name, rounds in measured.items()
    }


def _durability_rows(section: SectionResult, durability: dict[str, Any]) -> None:
    durable, unsynced = durability["durable"], durability["no_fsync"]
    section.data["durability"] = durability | {"connections": DURABILITY_CONNECTIONS}
    case = f"/predict, 1 record, {DURABILITY_CONNECTIONS} conns"
    for metric in ("p50", "p99"):
        section.row(
            case,
            f"{metric} with fsync before answer",
            fmt(durable[f"{metric}_ms"], " ms"),
            fmt(unsynced[f"{metric}_ms"], " ms"),
            ratio(durable[f"{metric}_ms"], unsynced[f"{metric}_ms"]),
            "no fsync wait",
            lower_is_better=True,
        )
    errors = (str(durable["errors"]), str(unsynced["errors"]))
    section.row(case, "errors", *errors, None, "no fsync wait", "0", durable["errors"] == 0)
    section.notes.append(
        "durable-before-answer cost: the same Bento with MEDOPS_PREDICTION_LOG_DURABLE=false (answers before "
        "the log fsync; a baseline only), medians of alternating rounds"
    )


def _log_rows(settings: Any) -> int:
    from pipelines.prediction_log import predictions_log_dir

    return sum(max(0, len(path.read_bytes().splitlines()) - 1) for path in predictions_log_dir(settings).glob("*.csv"))


def _summarise(measured: dict[str, list[dict[str, Any]]], bodies: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    summary = {}
    for key, runs in measured.items():
        n = int(key.split("/")[1])
        rps = median([r["req_per_s"] for r in runs])
        summary[key] = {
            "req_per_s": rps,
            "records_per_s": None if rps is None else rps * n,
            "p50_ms": median([r["p50_ms"] for r in runs]),
            "p99_ms": median([r["p99_ms"] for r in runs]),
            "errors": sum(r["errors"] for r in runs),
            "requests": sum(r["requests"] for r in runs),
        }
    return summary


def _rows_and_goals(section: SectionResult, summary: dict, bodies: tuple[int, ...], tool: str) -> None:
    for n in bodies:
        m, f, c = (summary[f"{t}/{n}"] for t in TARGETS)
        case = f"/predict, {n} record{'s' if n > 1 else ''}"
        speedup = ratio(m["req_per_s"], f["req_per_s"])
        p99_ok = m["p99_ms"] is not None and f["p99_ms"] is not None and m["p99_ms"] <= f["p99_ms"]
        met = speedup is not None and speedup >= 1.5 and p99_ok and m["errors"] == 0
        section.row(case, "req/s", fmt(m["req_per_s"]), fmt(f["req_per_s"]), speedup, "FastAPI", ">= 1.5x", met)
        section.row(
            case,
            "req/s vs ceiling",
            fmt(m["req_per_s"]),
            fmt(c["req_per_s"]),
            ratio(m["req_per_s"], c["req_per_s"]),
            "constant ASGI",
        )
        section.row(
            case,
            "records/s",
            fmt(m["records_per_s"]),
            fmt(f["records_per_s"]),
            ratio(m["records_per_s"], f["records_per_s"]),
            "FastAPI",
        )
        section.row(
            case,
            "p50 latency",
            fmt(m["p50_ms"], " ms"),
            fmt(f["p50_ms"], " ms"),
            ratio(m["p50_ms"], f["p50_ms"]),
            "FastAPI",
            lower_is_better=True,
        )
        section.row(
            case,
            "p99 latency",
            fmt(m["p99_ms"], " ms"),
            fmt(f["p99_ms"], " ms"),
            ratio(m["p99_ms"], f["p99_ms"]),
            "FastAPI",
            "<= baseline",
            p99_ok,
            lower_is_better=True,
        )
        section.row(
            case,
            "errors",
            str(m["errors"]),
            f"{f['errors']} / ceiling {c['errors']}",
            None,
            "FastAPI",
            "0",
            m["errors"] == 0,
        )
        section.goal(
            f"{n}-record /predict vs FastAPI",
            ">= 1.5x req/s, p99 <= baseline, 0 errors",
            f"{fmt(speedup)}x req/s, p99 {fmt(m['p99_ms'], ' ms')} vs {fmt(f['p99_ms'], ' ms')}, {m['errors']} errors",
            met,
        )
    section.notes.append(f"load tool: {tool}; medians of {section.params['runs']} interleaved runs per cell")


# Profiling the service in-process ----------------------------------------------------------------------
def profile_service(
    settings: Any, version: str, body_files: dict[int, Path], wrk: str | None, connections: int, seconds: float = 6.0
) -> dict[str, Any]:
    """Serve the service's ASGI app under pyinstrument in a child, load it, and return the hot spots.

    The child runs the same app ``bentoml serve`` runs in its worker (``MedopsService.to_asgi()``)
    under uvicorn in its main thread, so every request's work is on the profiled thread; it
    profiles only while the load runs (SIGUSR1 starts, SIGUSR2 stops and reports).
    """
    profiles = {}
    for n in sorted(body_files):
        try:
            profiles[f"{n}_records"] = _profile_one(
                settings, version, body_files[n], f"serving-{n}-records", wrk, connections, seconds
            )
        except Exception as error:  # a profile is a diagnosis aid: report why it is missing
            profiles[f"{n}_records"] = {"error": str(error)}
    return profiles


def _profile_one(
    settings: Any, version: str, body_file: Path, name: str, wrk: str | None, connections: int, seconds: float
) -> dict[str, Any]:
    port = free_port()
    out = Path(tempfile.mkdtemp(prefix="medops-bench-profile-")) / "result.json"
    env = child_env(
        {
            "MEDOPS_SERVING_MODEL_VERSION": version,
            "BENTOML_HOME": str(settings.bentoml_home),
            "MEDOPS_HOME": str(settings.home),
            **NO_KEY_LIMITS,
        }
    )
    argv = [
        sys.executable,
        "-m",
        "bench.serving",
        "profile-child",
        "--port",
        str(port),
        "--out",
        str(out),
        "--name",
        name,
    ]
    process = start_process(argv, env=env, log=settings.home / f"{name}.log")
    try:
        wait_until(
            lambda: http_ready(f"http://{HOST}:{port}/readyz"),
            120,
            "profiled service",
            alive=lambda: is_running(process),
        )
        url = f"http://{HOST}:{port}/predict"
        headers = {"Authorization": f"Bearer {API_KEY}"}
        os.kill(process.pid, signal.SIGUSR1)
        if wrk:
            run_wrk(wrk, url, body_file, connections=connections, seconds=seconds, headers=headers)
        else:
            run_python(url, body_file, connections=connections, seconds=seconds, headers=headers)
        os.kill(process.pid, signal.SIGUSR2)
        wait_until(out.exists, 60, "profile result", alive=lambda: is_running(process) or out.exists())
        return json.loads(out.read_text())
    finally:
        stop_process(process)


def _profile_child(port: int, out: Path, name: str) -> int:
    import uvicorn
    from pyinstrument import Profiler

    from bench.profiling import hot_spots, save
    from serving.service import MedopsService

    app = MedopsService.to_asgi()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning", access_log=False))
    profiler = Profiler(interval=0.0005, async_mode="disabled")

    def start(*_: Any) -> None:
        profiler.start()

    def stop(*_: Any) -> None:
        session = profiler.stop()
        result = {"hot_spots": hot_spots(session), "files": save(session, name)}
        out.write_text(json.dumps(result))
        server.should_exit = True

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    bound = threading.Timer(600, lambda: setattr(server, "should_exit", True))  # never outlive the bench
    bound.daemon = True
    bound.start()
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    child = sub.add_parser("profile-child")
    child.add_argument("--port", type=int, required=True)
    child.add_argument("--out", type=Path, required=True)
    child.add_argument("--name", required=True)
    options = parser.parse_args(argv)
    return _profile_child(options.port, options.out, options.name)


if __name__ == "__main__":
    sys.exit(main())
