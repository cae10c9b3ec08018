"""The Evidently UI medops starts: reports open to read on loopback, writes only with the secret."""

from __future__ import annotations

import httpx
import psutil
import pytest

from medops.app import platform
from medops.core import processes
from medops.core.settings import Settings
from serving.processes import find_free_port

pytestmark = pytest.mark.integration


def test_the_evidently_ui_refuses_writes_without_the_secret(medops_home: Settings, monkeypatch):
    port = find_free_port()
    monkeypatch.setenv("MEDOPS_EVIDENTLY_PORT", str(port))
    from medops.core.settings import get_settings, reset_settings

    reset_settings()
    settings = get_settings()
    pid = platform.start_evidently(settings)
    try:
        base = f"http://127.0.0.1:{port}"
        processes.wait_until(lambda: processes.http_ok(f"{base}/api/projects"), 60, "Evidently UI")
        assert settings.evidently_secret() not in " ".join(psutil.Process(pid).cmdline())
        body = {"name": "intruder", "description": "should not exist"}
        refused = httpx.post(f"{base}/api/projects", json=body, timeout=10)
        assert refused.status_code in (401, 403), refused.text
        assert httpx.get(f"{base}/api/projects", timeout=10).status_code == 200
        allowed = httpx.post(
            f"{base}/api/projects", json=body, headers={"evidently-secret": settings.evidently_secret()}, timeout=10
        )
        assert allowed.status_code < 300, allowed.text
    finally:
        processes.stop("evidently", settings)
