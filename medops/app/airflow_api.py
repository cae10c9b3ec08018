"""A small client for the Airflow 3 REST API (``/api/v2``) with the simple auth manager's token.

Used by `medops up` to unpause and trigger DAGs and by the end-to-end test to drive the platform
only through public interfaces.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"success", "failed"}


class AirflowError(RuntimeError):
    pass


def admin_password(airflow_home: Path) -> str | None:
    """The password `airflow standalone` generated for ``admin``, or None before it has."""
    path = airflow_home / "simple_auth_manager_passwords.json.generated"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("admin")


@dataclass
class AirflowClient:
    base_url: str
    username: str = "admin"
    password: str | None = None
    timeout: float = 30.0

    def __post_init__(self) -> None:
        self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout)
        self._token: str | None = None

    def close(self) -> None:
        self._http.close()

    def healthy(self) -> bool:
        try:
            response = self._http.get("/api/v2/monitor/health")
        except httpx.HTTPError:
            return False
        if response.status_code != 200:
            return False
        body = response.json()
        return all(body.get(part, {}).get("status") == "healthy" for part in ("metadatabase", "scheduler"))

    def _auth(self) -> dict[str, str]:
        if self._token is None:
            response = self._http.post("/auth/token", json={"username": self.username, "password": self.password})
            if response.status_code not in (200, 201):
                raise AirflowError(f"Airflow login failed ({response.status_code}): {response.text[:200]}")
            self._token = response.json()["access_token"]
        return {"Authorization": f"Bearer {self._token}"}

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, f"/api/v2{path}", headers=self._auth(), **kwargs)
        if response.status_code == 401:
            self._token = None
            response = self._http.request(method, f"/api/v2{path}", headers=self._auth(), **kwargs)
        if response.status_code >= 400:
            raise AirflowError(f"{method} {path}: {response.status_code} {response.text[:300]}")
        return response.json() if response.content else None

    def dag(self, dag_id: str) -> dict | None:
        try:
            return self.request("GET", f"/dags/{dag_id}")
        except AirflowError as error:
            if " 404 " in str(error):
                return None
            raise

    def import_errors(self) -> list[dict]:
        return self.request("GET", "/importErrors")["import_errors"]

    def unpause(self, dag_id: str) -> None:
        self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        run = self.request("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns", params={"order_by": "-start_date", "limit": 50})[
            "dag_runs"
        ]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 600, poll: float = 2.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(dag_id, run_id)
            if run["state"] in TERMINAL:
                return run
            time.sleep(poll)
        raise AirflowError(f"{dag_id} run {run_id} did not finish within {timeout:.0f}s")

    def wait_for_dags(self, dag_ids: list[str], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        missing = list(dag_ids)
        while time.monotonic() < deadline:
            missing = [dag_id for dag_id in dag_ids if self.dag(dag_id) is None]
            if not missing:
                return
            time.sleep(2)
        errors = "; ".join(f"{e['filename']}: {e['stack_trace'][-200:]}" for e in self.import_errors())
        raise AirflowError(f"DAGs not parsed within {timeout:.0f}s: {', '.join(missing)}. {errors}")
