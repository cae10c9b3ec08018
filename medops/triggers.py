"""Event-driven scheduling of ``ingest_data``: a trigger that watches the landing folder.

Runs in Airflow's triggerer. A file fires once it has stopped growing between two polls; a
marker in ``landing/.claimed/`` keeps the same file from firing again while its ingest runs.
The landing folder is resolved when the trigger runs (in the triggerer), never at DAG parse time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent


class LandingTrigger(BaseEventTrigger):
    """Fire when complete files wait in ``MEDOPS_HOME/landing`` that no ingest has claimed yet."""

    def __init__(self, poke_interval: float = 3.0) -> None:
        super().__init__()
        self.poke_interval = poke_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return "medops.triggers.LandingTrigger", {"poke_interval": self.poke_interval}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from medops.settings import get_settings
        from pipelines.ingest import CLAIMED, landing_files

        settings = get_settings()
        claimed_dir = settings.landing_dir / CLAIMED
        sizes: dict[str, int] = {}
        while True:
            ready = []
            for path in landing_files(settings):
                key = str(path.relative_to(settings.landing_dir)).replace("/", "__")
                size = path.stat().st_size
                if (claimed_dir / key).exists():
                    continue
                if sizes.get(key) == size:  # complete: it stopped growing between two polls
                    ready.append(key)
                sizes[key] = size
            if ready:
                claimed_dir.mkdir(parents=True, exist_ok=True)
                for key in ready:
                    (claimed_dir / key).write_text(str(sizes[key]))
                self.log.info("landing: %d file(s) ready: %s", len(ready), ", ".join(ready))
                yield TriggerEvent({"files": ready})
                return
            await asyncio.sleep(self.poke_interval)
