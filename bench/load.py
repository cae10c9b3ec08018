"""HTTP load from a separate process: wrk when it is there, else a small Python load generator.

``wrk`` (Debian package ``wrk``) is the load tool. When it is missing, :func:`ensure_wrk` installs
it with ``apt-get`` if we are root on a Debian-like system (that is what ``make bench`` on a fresh
machine does); otherwise, or if the install fails, the benchmarks fall back to the load generator
below (``python -m bench.load``): asyncio keep-alive connections over raw sockets, spread over a
few processes. It is slower than wrk, so the ceiling it can show is lower, and the results say
which tool produced them. Both keep a fixed number of connections busy (closed loop), are bounded
in time, and the Python one is also bounded in request count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

WRK_PACKAGE = "wrk"


@dataclass
class LoadResult:
    """One load run: throughput, latency percentiles (ms) and errors (transport + non-2xx)."""

    tool: str
    seconds: float
    requests: int
    errors: int
    non_2xx: int
    transport_errors: int
    req_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def ensure_wrk(install: bool = True) -> str | None:
    """Path of ``wrk``, installing the Debian package when missing and allowed (root + apt-get)."""
    found = shutil.which("wrk")
    if found or not install:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300, check=False)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", WRK_PACKAGE],
            env=env,
            capture_output=True,
            timeout=300,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shutil.which("wrk")


# wrk -----------------------------------------------------------------------------------------------
_WRK_SCRIPT = """
local f = assert(io.open(%(body)s, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%%.0f,"duration_us":%%.0f,"connect":%%.0f,"read":%%.0f,"write":%%.0f,' ..
    '"status":%%.0f,"timeout":%%.0f,"p50_us":%%.0f,"p90_us":%%.0f,"p99_us":%%.0f,"max_us":%%.0f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(
    wrk: str,
    url: str,
    body_file: Path,
    *,
    connections: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    threads: int = 1,
) -> LoadResult:
    """POST ``body_file`` to ``url`` over ``connections`` keep-alive connections for ``seconds``."""
    header_lines = "\n".join(f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in (headers or {}).items())
    with tempfile.TemporaryDirectory(prefix="medops-bench-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_WRK_SCRIPT % {"body": _lua_string(str(body_file)), "headers": header_lines})
        argv = [
            wrk,
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ]
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    line = next((x for x in completed.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {(completed.stderr or completed.stdout)[-400:]}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    duration = raw["duration_us"] / 1e6
    transport = int(raw["connect"] + raw["read"] + raw["write"] + raw["timeout"])
    non_2xx = int(raw["status"])
    ok = int(raw["requests"]) - non_2xx
    return LoadResult(
        tool="wrk",
        seconds=duration,
        requests=int(raw["requests"]),
        errors=transport + non_2xx,
        non_2xx=non_2xx,
        transport_errors=transport,
        req_per_s=ok / duration if duration else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
    )


# Python fallback ----------------------------------------------------------------------------------------
def run_python(
    url: str,
    body_file: Path,
    *,
    connections: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    max_requests: int = 500_000,
    processes: int = 2,
) -> LoadResult:
    """The same closed loop as :func:`run_wrk` from ``python -m bench.load`` (a separate process)."""
    argv = [
        sys.executable,
        "-m",
        "bench.load",
        "--url",
        url,
        "--body",
        str(body_file),
        "--connections",
        str(connections),
        "--seconds",
        str(seconds),
        "--max-requests",
        str(max_requests),
        "--processes",
        str(processes),
    ]
    for name, value in (headers or {}).items():
        argv += ["--header", f"{name}: {value}"]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"python load generator failed: {completed.stderr[-400:]}")
    return LoadResult(**json.loads(completed.stdout.strip().splitlines()[-1]))


async def _one_connection(
    host: str,
    port: int,
    request: bytes,
    deadline: float,
    budget: list[int],
    latencies: list[float],
    counts: dict[str, int],
) -> None:
    reader = writer = None
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            started = time.perf_counter()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status = int(head[9:12])
            length, chunked, close = 0, False, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and b"close" in value.lower():
                    close = True
            if chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            elif length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            counts["requests"] += 1
            if not 200 <= status < 300:
                counts["non_2xx"] += 1
            if close:
                writer.close()
                reader = writer = None
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            counts["transport"] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def _worker(args: tuple[str, int, bytes, int, float, int]) -> tuple[list[float], dict[str, int], float]:
    host, port, request, connections, seconds, max_requests = args

    async def main() -> tuple[list[float], dict[str, int], float]:
        latencies: list[float] = []
        counts = {"requests": 0, "non_2xx": 0, "transport": 0}
        budget = [max_requests]
        started = time.monotonic()
        deadline = started + seconds
        await asyncio.gather(
            *(_one_connection(host, port, request, deadline, budget, latencies, counts) for _ in range(connections))
        )
        return latencies, counts, time.monotonic() - started

    return asyncio.run(main())


def _main(argv: list[str] | None = None) -> int:
    import multiprocessing

    parser = argparse.ArgumentParser(description="Closed-loop HTTP POST load (fallback when wrk is missing).")
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, type=Path)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=500_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--header", action="append", default=[])
    options = parser.parse_args(argv)
    parts = urlsplit(options.url)
    body = options.body.read_bytes()
    lines = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *options.header,
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    processes = max(1, min(options.processes, options.connections))
    per = [options.connections // processes + (i < options.connections % processes) for i in range(processes)]
    jobs = [
        (parts.hostname, parts.port or 80, request, n, options.seconds, options.max_requests // processes) for n in per
    ]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        outcomes = pool.map(_worker, jobs)
    import numpy as np

    latencies = np.array([x for lat, _, _ in outcomes for x in lat]) * 1000
    requests = sum(c["requests"] for _, c, _ in outcomes)
    non_2xx = sum(c["non_2xx"] for _, c, _ in outcomes)
    transport = sum(c["transport"] for _, c, _ in outcomes)
    seconds = max(s for _, _, s in outcomes)
    if len(latencies) == 0:
        latencies = np.zeros(1)
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    result = LoadResult(
        tool="python",
        seconds=seconds,
        requests=requests,
        errors=non_2xx + transport,
        non_2xx=non_2xx,
        transport_errors=transport,
        req_per_s=(requests - non_2xx) / seconds if seconds else 0.0,
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        max_ms=float(latencies.max()),
    )
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
