"""The Airflow facade's own logic against a stand-in for Airflow's token route and /api/v2: logging in,
renewing an expired token once, a DAG not parsed yet, XCom values stored as JSON text, errors in one line.
The calls themselves are apache-airflow-client's; the end-to-end test drives a real airflow standalone."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from medops.app.airflow_api import AirflowClient, AirflowError

RUN = {
    "dag_display_name": "monitor_drift",
    "dag_id": "monitor_drift",
    "dag_run_id": "manual__1",
    "dag_versions": [],
    "run_after": "2026-01-01T00:00:00Z",
    "run_type": "manual",
    "state": "success",
    "conf": {"since": "2026-01-01T00:00:00+00:00"},
}
VERDICT = {"verdict": "drift", "sites": ["site-d"]}


@pytest.fixture
def airflow() -> Iterator[SimpleNamespace]:
    """Issues tokens t1, t2...; the first token expires after one /api/v2 call, as a long wait would see."""
    seen = SimpleNamespace(logins=[], calls=[], token_uses={})

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/auth/token":
                if body != {"username": "admin", "password": "secret"}:
                    return self.answer(401, {"detail": "Invalid credentials"})
                seen.logins.append(body)
                return self.answer(201, {"access_token": f"t{len(seen.logins)}"})
            if self.authorized():
                seen.calls.append(("POST", self.path, body))
                self.answer(200, RUN | {"state": "queued", "conf": body["conf"]})

        def do_GET(self) -> None:
            if self.path == "/api/v2/monitor/health":
                return self.answer(
                    200, {"metadatabase": {"status": "healthy"}, "scheduler": {"status": "healthy"}, "triggerer": {}}
                )
            if not self.authorized():
                return
            seen.calls.append(("GET", self.path, None))
            if self.path == "/api/v2/dags/not_parsed":
                return self.answer(404, {"detail": "The Dag with ID: `not_parsed` was not found"})
            if self.path.startswith(
                "/api/v2/dags/monitor_drift/dagRuns/manual__1/taskInstances/check_drift/xcomEntries"
            ):
                xcom = {key: RUN[key] for key in ("dag_display_name", "dag_id", "run_after")}
                xcom |= {
                    "key": "return_value",
                    "map_index": -1,
                    "run_id": "manual__1",
                    "task_display_name": "check_drift",
                }
                xcom |= {"task_id": "check_drift", "timestamp": "2026-01-01T00:01:00Z", "value": json.dumps(VERDICT)}
                return self.answer(200, xcom)
            if self.path == "/api/v2/dags/monitor_drift/dagRuns/manual__1":
                return self.answer(200, RUN)
            self.answer(500, {"detail": "the scheduler is down"})

        def authorized(self) -> bool:
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            seen.token_uses[token] = seen.token_uses.get(token, 0) + 1
            if token == "t1" and seen.token_uses[token] > 1 or not token.startswith("t"):
                self.answer(401, {"detail": "Token expired"})
                return False
            return True

        def answer(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}", seen=seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_login_renewal_and_typed_answers(airflow: SimpleNamespace):
    with AirflowClient(airflow.url, password="secret", timeout=5) as client:
        assert client.healthy() and airflow.seen.logins == []  # the health route needs no login
        assert client.trigger("monitor_drift", {"since": "2026-01-01"}) == "manual__1"
        method, path, body = airflow.seen.calls[0]
        assert (method, path) == ("POST", "/api/v2/dags/monitor_drift/dagRuns")
        assert body == {"logical_date": None, "conf": {"since": "2026-01-01"}}  # Airflow 3 wants logical_date
        run = client.wait_for_run("monitor_drift", "manual__1", timeout=5, poll=0.1)  # t1 expired: renewed
        assert run.state == "success" and run.conf == RUN["conf"]
        assert len(airflow.seen.logins) == 2
        assert client.xcom("monitor_drift", "manual__1", "check_drift") == VERDICT
        assert client.dag("not_parsed") is None
        with pytest.raises(AirflowError, match=r"^list runs of monitor_drift: 500 .*the scheduler is down") as error:
            client.runs("monitor_drift")
        assert error.value.status == 500


def test_wrong_password_is_one_clear_line(airflow: SimpleNamespace):
    with AirflowClient(airflow.url, password="wrong", timeout=5) as client:
        with pytest.raises(AirflowError, match="Airflow login as admin failed \\(401\\)"):
            client.run("monitor_drift", "manual__1")
