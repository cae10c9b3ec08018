"""What every benchmark section shares: the machine, medians, child processes, temporary homes, timers.

Rules the sections follow (the machine is small and shared): every figure is a ratio against a
baseline measured in the same run, a median of at least ``runs`` measurements, interleaved with
its baseline; servers listen on 127.0.0.1 only; every loop is bounded in count and in time; every
process a section starts is stopped by that section (and, as a last resort, at exit).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medops.core.processes import ProcessRecord

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
HOST = "127.0.0.1"
VENV_BIN = Path(sys.executable).parent


# The machine ----------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """Cores, RAM, CPU model and load: what a reader needs to judge the figures."""
    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    ram_bytes = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_bytes = int(line.split()[1]) * 1024
                break
    return {
        "cores": os.cpu_count() or 1,
        "ram_gib": round(ram_bytes / 2**30, 1),
        "cpu_model": cpu_model,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# Figures --------------------------------------------------------------------------------------------
def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


@dataclass
class Goal:
    """One target from the issue, and whether this run met it (None: not measured)."""

    section: str
    name: str
    target: str
    value: str
    met: bool | None

    def to_dict(self) -> dict[str, Any]:
        return {"section": self.section, "name": self.name, "target": self.target, "value": self.value, "met": self.met}


@dataclass
class SectionResult:
    """What one section hands back: its parameters, raw runs, medians, table rows and goals."""

    name: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(
        self,
        case: str,
        metric: str,
        medops: Any,
        baseline: Any = None,
        ratio: float | None = None,
        baseline_name: str = "",
        goal: str = "",
        met: bool | None = None,
        lower_is_better: bool = False,
    ) -> None:
        """One line of the printed table; ``ratio`` is always medops / baseline of the metric."""
        self.rows.append(
            {
                "case": case,
                "metric": metric,
                "medops": medops,
                "baseline": baseline,
                "baseline_name": baseline_name,
                "ratio": None if ratio is None else round(ratio, 4),
                "lower_is_better": lower_is_better,
                "goal": goal,
                "met": met,
            }
        )

    def goal(self, name: str, target: str, value: str, met: bool | None) -> None:
        self.goals.append(Goal(self.name, name, target, value, met))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 1),
            "params": self.params,
            "data": self.data,
            "rows": self.rows,
            "goals": [g.to_dict() for g in self.goals],
            "notes": self.notes,
        }


# Processes --------------------------------------------------------------------------------------------
_STARTED: dict[int, ProcessRecord] = {}


def start_process(
    argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT
) -> ProcessRecord:
    """Start a child on the platform's supervisor, in its own session with its output in ``log``."""
    from medops.core.processes import start_detached

    record = start_detached(argv, log=log, env=dict(os.environ) if env is None else env, cwd=cwd)
    _STARTED[record.pid] = record
    return record


def stop_process(record: ProcessRecord, timeout: float = 20.0) -> None:
    """Stop the child and everything it started, as ``make stop`` does."""
    from medops.core.processes import stop_process as stop

    _STARTED.pop(record.pid, None)
    stop(record, timeout=timeout)


@atexit.register
def _stop_leftovers() -> None:
    for record in list(_STARTED.values()):
        stop_process(record, timeout=5.0)


def terminate_on_signals() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks stop what a section started."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def free_port(host: str = HOST) -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_ready(url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


# MEDOPS_HOME --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def medops_home(prefix: str, keep: bool = False, **env: str) -> Iterator[Any]:
    """A temporary MEDOPS_HOME (and ``MEDOPS_*`` variables) for this process and its children."""
    from medops.core.settings import get_settings, reset_settings

    saved = {name: value for name, value in os.environ.items() if name.startswith("MEDOPS_")}
    root = Path(tempfile.mkdtemp(prefix=f"medops-bench-{prefix}-"))
    for name in saved:
        del os.environ[name]
    os.environ["MEDOPS_HOME"] = str(root / "home")
    os.environ.update(env)
    reset_settings()
    try:
        yield get_settings()
    finally:
        for name in [n for n in os.environ if n.startswith("MEDOPS_")]:
            del os.environ[name]
        os.environ.update(saved)
        reset_settings()
        if not keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    env.setdefault("GIT_PYTHON_REFRESH", "quiet")
    env.update(extra or {})
    return env


# Measuring in a fresh process -------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM; ``ru_maxrss`` where /proc is missing)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class PeakMemory:
    """Peak RSS before the measured work (imports, loading) and during it; ``peak`` is the larger."""

    before: int = 0
    during: int = 0

    @property
    def peak(self) -> int:
        return max(self.before, self.during)


@contextlib.contextmanager
def peak_memory() -> Iterator[PeakMemory]:
    """Measure the peak RSS of the enclosed work by restarting the kernel's counter at entry."""
    found = PeakMemory(before=peak_rss_bytes())
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")  # VmHWM := current RSS
    except OSError:
        pass  # without the reset, ``during`` is the whole-life peak: an upper bound
    try:
        yield found
    finally:
        found.during = peak_rss_bytes()


def in_fresh_fork(function: Callable[..., dict], *args: Any, timeout: float = 600) -> dict:
    """Run ``function(*args)`` in a child forked from this process and return its result.

    The child starts with this process's imports (so library import time is not measured; they
    are frozen out of its garbage collector, as in Airflow's forks) but none of the measured
    work's state: memory counters, caches and module-level state are its own, like the DAG
    processor's per-file children. The kernel's peak-RSS counter starts at the child's current
    RSS, so ``peak_rss_bytes`` in the child includes the inherited imports.
    """
    import multiprocessing
    import traceback

    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def target() -> None:
        try:
            sender.send({"ok": function(*args)})
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            sender.send({"error": f"{error!r}\n{traceback.format_exc()[-1500:]}"})

    process = context.Process(target=target, daemon=True)
    # As Airflow's DAG processor and LocalExecutor do before they fork: keep the child's garbage
    # collector off the parent's objects, or its first full collection copies every page they sit on.
    gc.freeze()
    try:
        process.start()
    finally:
        gc.unfreeze()
    try:
        if not receiver.poll(timeout):
            raise TimeoutError(f"{getattr(function, '__name__', function)} did not finish within {timeout:.0f} s")
        message = receiver.recv()
    finally:
        if process.is_alive():
            process.join(5)
        if process.is_alive():
            process.kill()
        process.join()
        receiver.close()
    if "error" in message:
        raise RuntimeError(message["error"])
    return message["ok"]


def run_json_child(module: str, args: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run ``python -m module args`` in a fresh process; its last stdout line is a JSON object."""
    import json

    completed = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
    if completed.returncode != 0:
        tail = "\n".join((completed.stderr or completed.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed ({completed.returncode}): {tail}")
    lines = [line for line in completed.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"python -m {module} printed no JSON result: {completed.stdout[-300:]}")
    return json.loads(lines[-1])


def gib(n_bytes: float | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**30:.2f} GiB"


def fmt(value: float | None, unit: str = "", digits: int = 3) -> str:
    """A number with a sensible count of significant digits (``n/a`` when missing)."""
    if value is None:
        return "n/a"
    if value == 0:
        return f"0{unit}"
    magnitude = abs(value)
    if magnitude >= 100:
        text = f"{value:,.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.{digits}g}"
    return f"{text}{unit}"
