"""How the rollout tells a running stable server which model version to serve, and hears back.

The rollout writes the requested version to ``<control dir>/model.json`` (atomically); every worker
of the stable server polls that file, loads the version from the BentoML store, checks it, swaps it
in whole and answers with ``ack-<pid>.json``; the switch is done once every live worker answered. A
worker that (re)starts later reads the same file first, so all workers converge on one version.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medops.core.files import write_atomically

logger = logging.getLogger("medops.serving")

CONTROL_ENV = "MEDOPS_SERVING_CONTROL_DIR"
REQUEST_FILE = "model.json"


def request_model(control_dir: Path, version: str) -> None:
    """Ask the stable server's workers to serve ``version``."""
    payload = {"model_version": str(version), "requested_at": time.time()}
    write_atomically(control_dir / REQUEST_FILE, json.dumps(payload))


def requested_model(control_dir: Path) -> str | None:
    try:
        return str(json.loads((control_dir / REQUEST_FILE).read_text())["model_version"])
    except (OSError, ValueError, KeyError):
        return None


def write_ack(control_dir: Path, version: str, error: str | None = None) -> None:
    payload = {"pid": os.getpid(), "model_version": str(version), "error": error, "at": time.time()}
    write_atomically(control_dir / f"ack-{os.getpid()}.json", json.dumps(payload))


def read_acks(control_dir: Path) -> dict[int, dict[str, Any]]:
    acks: dict[int, dict[str, Any]] = {}
    for path in control_dir.glob("ack-*.json"):
        try:
            ack = json.loads(path.read_text())
            acks[int(ack["pid"])] = ack
        except (OSError, ValueError, KeyError):
            continue
    return acks


class ModelWatcher:
    """A daemon thread in a serving worker that follows ``model.json``: ``switch(version)`` loads, checks
    and installs the version or raises; acknowledged either way, so the rollout never waits for a timeout."""

    def __init__(
        self, control_dir: Path, current: Callable[[], str], switch: Callable[[str], None], *, interval: float = 0.2
    ) -> None:
        self.control_dir = control_dir
        self.current = current
        self.switch = switch
        self.interval = interval
        self._stop = threading.Event()
        self._mtime: float | None = None
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)

    def start(self) -> None:
        write_ack(self.control_dir, self.current())
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        path = self.control_dir / REQUEST_FILE
        while not self._stop.wait(self.interval):
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue
            if mtime == self._mtime:
                continue
            self._mtime = mtime
            wanted = requested_model(self.control_dir)
            if wanted is None:
                continue
            try:
                if wanted != self.current():
                    self.switch(wanted)
                    logger.info("now serving model version %s", wanted)
            except Exception as exc:  # reported to the rollout, which keeps the old version
                logger.exception("could not switch to model version %s", wanted)
                write_ack(self.control_dir, wanted, error=f"{type(exc).__name__}: {exc}")
            else:
                write_ack(self.control_dir, wanted)
