"""Airflow 3's REST API (``/api/v2``) through its official client, ``apache-airflow-client``.

:class:`AirflowClient` is a small facade over the client's typed APIs, for `medops up`, the drift
scenario, the end-to-end test and the loop benchmark. The simple auth manager's JWT comes from
``POST /auth/token``, outside the generated client, so that one call is made with httpx; a token
that expired (401) is replaced once per call.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import urllib3
from airflow_client.client import (
    ApiClient,
    Configuration,
    DAGApi,
    DagRunApi,
    ImportErrorApi,
    MonitorApi,
    TaskInstanceApi,
    XComApi,
)
from airflow_client.client.exceptions import ApiException, UnauthorizedException
from airflow_client.client.models import (
    DAGPatchBody,
    DAGResponse,
    DAGRunPatchBody,
    DAGRunResponse,
    ImportErrorResponse,
    TaskInstanceResponse,
    TriggerDAGRunPostBody,
)

from medops.core.files import write_atomically
from medops.core.processes import wait_until
from medops.core.settings import Settings

ADMIN_PASSWORD = "airflow_admin_password"  # the secret's name under MEDOPS_HOME/secrets
FINISHED = frozenset({"success", "failed"})
RUNS_LISTED = 50  # newest first; more than any caller looks back over

T = TypeVar("T")


class AirflowError(RuntimeError):
    """Airflow refused a call or could not be logged in to; one line for the terminal."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def admin_password(settings: Settings) -> str | None:
    """Airflow's ``admin`` password (a medops secret), or None before `medops up` wrote Airflow's
    password file (no API server to log in to, as under ``dag.test()``)."""
    return settings.secret(ADMIN_PASSWORD) if settings.airflow_passwords_file.exists() else None


def write_passwords_file(settings: Settings) -> Path:
    """Airflow's password file with medops' ``admin`` password, private, before Airflow starts: for
    a user missing from it Airflow generates a password and prints it, into a log."""
    content = json.dumps({"admin": settings.secret(ADMIN_PASSWORD)})
    return write_atomically(settings.airflow_passwords_file, content, mode=0o600)


class AirflowClient:
    """The calls medops makes to one Airflow API server, as ``username`` (simple auth manager)."""

    def __init__(self, base_url: str, username: str = "admin", password: str | None = None, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.password = password
        self.timeout = timeout
        self._api = ApiClient(Configuration(host=self.base_url))

    def __enter__(self) -> AirflowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._api.rest_client.pool_manager.clear()

    # authentication -------------------------------------------------------------------------
    def _login(self) -> None:
        try:
            response = httpx.post(
                f"{self.base_url}/auth/token",
                json={"username": self.username, "password": self.password},
                timeout=self.timeout,
            )
        except httpx.HTTPError as error:
            raise AirflowError(f"cannot reach Airflow at {self.base_url} to log in: {error}") from None
        if response.status_code not in (200, 201):
            raise AirflowError(
                f"Airflow login as {self.username} failed ({response.status_code}): {response.text[:200]}"
            )
        self._api.configuration.access_token = response.json()["access_token"]

    def _call(self, what: str, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``method(*args, **kwargs)`` with a token, renewed once on 401; Airflow's refusals become
        :class:`AirflowError`."""
        if self._api.configuration.access_token is None:
            self._login()
        try:
            try:
                return method(*args, _request_timeout=self.timeout, **kwargs)
            except UnauthorizedException:
                self._login()
                return method(*args, _request_timeout=self.timeout, **kwargs)
        except ApiException as error:
            body = (error.body or error.reason or "").replace("\n", " ")[:300]
            raise AirflowError(f"{what}: {error.status} {body}", error.status) from None

    # calls ------------------------------------------------------------------------------------
    def healthy(self) -> bool:
        """Metadata database and scheduler report healthy (this route needs no login)."""
        try:
            health = MonitorApi(self._api).get_health(_request_timeout=self.timeout)
        except (ApiException, urllib3.exceptions.HTTPError, ValueError):
            return False
        return health.metadatabase.status == "healthy" and health.scheduler.status == "healthy"

    def dag(self, dag_id: str) -> DAGResponse | None:
        """The DAG, or None while the DAG processor has not parsed it."""
        try:
            return self._call(f"GET dag {dag_id}", DAGApi(self._api).get_dag, dag_id)
        except AirflowError as error:
            if error.status == 404:
                return None
            raise

    def import_errors(self) -> list[ImportErrorResponse]:
        return self._call("GET import errors", ImportErrorApi(self._api).get_import_errors).import_errors

    def _set_paused(self, dag_id: str, paused: bool) -> None:
        self._call(f"PATCH dag {dag_id}", DAGApi(self._api).patch_dag, dag_id, DAGPatchBody(is_paused=paused))

    def unpause(self, dag_id: str) -> None:
        self._set_paused(dag_id, False)

    def pause(self, dag_id: str) -> None:
        self._set_paused(dag_id, True)

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Start a manual run now (no logical date, as Airflow 3 asks) and return its run id."""
        body = TriggerDAGRunPostBody(logical_date=None, conf=conf or {})
        return self._call(f"trigger {dag_id}", DagRunApi(self._api).trigger_dag_run, dag_id, body).dag_run_id

    def runs(self, dag_id: str) -> list[DAGRunResponse]:
        """The DAG's latest runs, most recently started first."""
        listing = DagRunApi(self._api).get_dag_runs
        listed = self._call(f"list runs of {dag_id}", listing, dag_id, order_by=["-start_date"], limit=RUNS_LISTED)
        return listed.dag_runs

    def run(self, dag_id: str, run_id: str) -> DAGRunResponse:
        return self._call(f"GET run {dag_id}/{run_id}", DagRunApi(self._api).get_dag_run, dag_id, run_id)

    def set_note(self, dag_id: str, run_id: str, note: str) -> None:
        """Replace the run's note (Markdown, shown in the grid and on the run's page)."""
        patch, body = DagRunApi(self._api).patch_dag_run, DAGRunPatchBody(note=note)
        self._call(f"PATCH note of {dag_id}/{run_id}", patch, dag_id, run_id, body, update_mask=["note"])

    def task_instances(self, dag_id: str, run_id: str) -> list[TaskInstanceResponse]:
        listing = TaskInstanceApi(self._api).get_task_instances
        return self._call(f"list task instances of {dag_id}/{run_id}", listing, dag_id, run_id).task_instances

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """The value ``task_id`` pushed under ``key`` in that run (a task's return value by default)."""
        get_entry = XComApi(self._api).get_xcom_entry
        entry = self._call(f"GET XCom {dag_id}/{run_id}/{task_id}/{key}", get_entry, dag_id, task_id, run_id, key)
        value = entry.actual_instance.value
        # The native form is what the metadata DB holds; values stored as JSON text come back as text.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return json.loads(value)
        return value

    # waiting ----------------------------------------------------------------------------------
    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 600, poll: float = 2.0) -> DAGRunResponse:
        """The run once it succeeded or failed; ``TimeoutError`` if it has not within ``timeout``."""

        def finished() -> DAGRunResponse | None:
            run = self.run(dag_id, run_id)
            return run if run.state.value in FINISHED else None

        return wait_until(finished, timeout, f"{dag_id} run {run_id}", poll=poll, hint="see its logs in the Airflow UI")

    def wait_for_dags(self, dag_ids: list[str], timeout: float = 180) -> None:
        """Wait until the DAG processor has parsed every one of ``dag_ids``; name import errors if not."""
        try:
            wait_until(
                lambda: all(self.dag(dag_id) is not None for dag_id in dag_ids), timeout, "DAGs parsed", poll=2.0
            )
        except TimeoutError:
            missing = [dag_id for dag_id in dag_ids if self.dag(dag_id) is None]
            errors = "; ".join(f"{e.filename}: {e.stack_trace[-200:]}" for e in self.import_errors())
            raise AirflowError(f"DAGs not parsed within {timeout:.0f}s: {', '.join(missing)}. {errors}") from None
