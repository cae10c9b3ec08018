"""The simulated clinical app against a tiny in-test stand-in for the service's HTTP contract."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from medops.app.simulate import AREA_FEATURES, LENGTH_FEATURES, SimulationError, simulate, traffic
from medops.core.settings import Settings
from pipelines.data import seed_frame
from pipelines.schema import ENCOUNTER, FEATURE_RANGES, FEATURES, LABEL, POSITIVE, SITE


@pytest.fixture
def service(medops_home: Settings) -> Iterator[SimpleNamespace]:
    """/predict and /feedback as the contract says: bearer key, 422 naming out-of-range fields."""
    key = medops_home.service_api_keys()[0]
    seen = SimpleNamespace(predict_calls=[], feedback=[], refused=0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.headers.get("Authorization") != f"Bearer {key}":
                return self.answer(401, {"error": "missing or wrong API key", "detail": []})
            if self.path == "/feedback":
                seen.feedback.extend(body["labels"])
                return self.answer(200, {"recorded": len(body["labels"])})
            records = body["records"]
            seen.predict_calls.append(records)
            detail = [
                {
                    "field": f"records[{i}].{name}",
                    "reason": f"out of plausible range {FEATURE_RANGES[name]}",
                    "type": "le",
                }
                for i, record in enumerate(records)
                for name in FEATURES
                if not FEATURE_RANGES[name][0] <= record[name] <= FEATURE_RANGES[name][1]
            ]
            if detail:
                seen.refused += len({item["field"].split(".")[0] for item in detail})
                return self.answer(422, {"error": "invalid request", "detail": detail})
            predictions = [
                {
                    "label": POSITIVE if r["mean_radius"] > 15 else "benign",
                    "probability_malignant": 0.9 if r["mean_radius"] > 15 else 0.1,
                    "encounter_id": r.get(ENCOUNTER),
                }
                for r in records
            ]
            self.answer(200, {"model_name": "m", "model_version": "7", "predictions": predictions})

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
    thread = threading.Thread(target=server.serve_forever, name="service-stub", daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}", seen=seen, settings=medops_home)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_plain_traffic_is_scored_in_batches_with_unique_encounters(service):
    summary = simulate(
        "site-a", 120, None, False, service.settings, base_url=service.url, batch_size=50, seed=1, progress=False
    )
    assert (summary.records, summary.scored, summary.rejected, summary.batches) == (120, 120, 0, 3)
    assert summary.model_versions == ["7"] and 0 < summary.predicted_malignant < 120
    sent = [record for call in service.seen.predict_calls for record in call]
    assert [len(call) for call in service.seen.predict_calls] == [50, 50, 20]
    assert {record[SITE] for record in sent} == {"site-a"}
    assert len({record[ENCOUNTER] for record in sent}) == 120
    assert set(sent[0]) == {*FEATURES, ENCOUNTER, SITE}  # no label or anything else leaves the app


def test_units_drift_is_refused_counted_and_the_rest_still_scored(service):
    summary = simulate(
        "site-u", 400, "units", False, service.settings, base_url=service.url, batch_size=40, seed=2, progress=False
    )
    assert summary.rejected == service.seen.refused
    assert 60 < summary.rejected < 140  # about a quarter
    assert summary.scored + summary.rejected == 400
    assert any(reason.startswith("records[*].mean_radius") for reason in summary.rejection_reasons)


def test_feedback_sends_the_true_diagnosis_of_every_scored_case(service):
    summary = simulate("site-f", 90, None, True, service.settings, base_url=service.url, seed=3, progress=False)
    assert summary.feedback_sent == summary.scored == len(service.seen.feedback) == 90
    scored_ids = {record[ENCOUNTER] for call in service.seen.predict_calls for record in call}
    assert {label[ENCOUNTER] for label in service.seen.feedback} == scored_ids
    assert {label["diagnosis"] for label in service.seen.feedback} == {"malignant", "benign"}


def test_shifts_are_realistic_and_stay_in_range():
    seed = seed_frame()
    plain = traffic("s", 4000, None, seed=4)
    covariate = traffic("s", 4000, "covariate", seed=4)
    prevalence = traffic("s", 4000, "prevalence", seed=4)
    for name in LENGTH_FEATURES:
        assert covariate[name].mean() / plain[name].mean() == pytest.approx(1.25, rel=0.01)
    for name in AREA_FEATURES:
        assert covariate[name].mean() / plain[name].mean() == pytest.approx(1.5625, rel=0.01)
    for frame in (plain, covariate, prevalence):
        for name, (low, high) in FEATURE_RANGES.items():
            assert frame[name].between(low, high).all(), name
    assert (seed[LABEL] == POSITIVE).mean() == pytest.approx(0.37, abs=0.01)
    assert (prevalence[LABEL] == POSITIVE).mean() == pytest.approx(0.8, abs=0.03)
    assert (plain[LABEL] == POSITIVE).mean() == pytest.approx(0.37, abs=0.03)
    assert plain[ENCOUNTER].is_unique and not set(plain[ENCOUNTER]) & set(traffic("s", 10, None, seed=4)[ENCOUNTER])


def test_errors_are_one_clear_line(service):
    with pytest.raises(SimulationError, match="401"):
        simulate("s", 5, settings=service.settings, base_url=service.url, api_key="wrong", progress=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(SimulationError, match="cannot reach the service"):
        simulate("s", 5, settings=service.settings, base_url=closed, progress=False)
    with pytest.raises(ValueError, match="unknown drift"):
        traffic("s", 5, "seasonal")


def test_medops_simulate_and_monitor_commands(service, monkeypatch):
    from typer.testing import CliRunner

    from medops.app.cli import app
    from pipelines import model_registry

    runner = CliRunner()
    done = runner.invoke(app, ["simulate", "--site", "site-c", "--records", "30", "--url", service.url, "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["scored"] == 30
    bad = runner.invoke(app, ["simulate", "--site", "s", "--drift", "seasonal", "--url", service.url])
    assert bad.exit_code != 0 and "covariate" in bad.output
    # No model has been trained here (and creating an empty MLflow store takes many seconds).
    monkeypatch.setattr(model_registry, "champion_version", lambda settings: None)
    done = runner.invoke(app, ["monitor", "--no-alert"])
    assert done.exit_code == 0, done.output
    assert "insufficient_data" in done.stdout and "no @champion" in done.stdout
