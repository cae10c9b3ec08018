"""MedopsClient, the typed client clinical apps and medops' own tools use, against the service's ASGI app."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from serving_fixtures import API_KEY, breast_cancer_frame, records, service_app, serving_home, shared_registry
from starlette.testclient import TestClient

from medops.core.settings import Settings
from pipelines.prediction_log import hash_encounter_id, read_feedback, read_predictions
from pipelines.schema import FEATURES, POSITIVE
from serving.client import MedopsClient, ServiceError
from serving.contract import PredictResponse

URL = "http://medops.test"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    tracking_uri, _ = shared_registry()
    with serving_home(tmp_path_factory.mktemp("client"), MEDOPS_MLFLOW_TRACKING_URI=tracking_uri) as settings:
        yield settings


@pytest.fixture(scope="module")
def version(home: Settings) -> str:
    return shared_registry()[1]


@pytest.fixture(scope="module")
def asgi(home: Settings, version: str) -> Iterator[TestClient]:
    with service_app(home, version) as app, TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def client(asgi: TestClient, key: str = API_KEY, **options: Any) -> MedopsClient:
    return MedopsClient(URL, key, http=asgi, **options)


def test_predict_explain_feedback_metadata_round_trip(asgi: TestClient, home: Settings, version: str):
    from pipelines.model_registry import load_model

    service = client(asgi, site_id="site-k")
    body = records(4, start=60)
    answer = service.predict(body)
    assert isinstance(answer, PredictResponse)
    assert answer.model_version == version and service.last_model_version == version
    estimator = load_model(version, home)
    frame = breast_cancer_frame()[list(FEATURES)].iloc[60:64]
    expected = estimator.predict_proba(frame)[:, list(estimator.classes_).index(POSITIVE)]
    np.testing.assert_allclose([p.probability_malignant for p in answer.predictions], expected, rtol=0, atol=1e-12)
    assert [p.encounter_id for p in answer.predictions] == ["enc-60", "enc-61", "enc-62", "enc-63"]

    logged = read_predictions(home)
    mine = logged[logged["encounter_hash"] == hash_encounter_id("enc-61", home)]
    assert mine["site_id"].tolist() == ["site-k"]  # the client's site header reached the log

    explained = service.explain(body[:2])
    assert [e.encounter_id for e in explained.explanations] == ["enc-60", "enc-61"]
    first = explained.explanations[0]
    assert set(first.contributions) == set(FEATURES)
    assert sum(first.contributions.values()) == pytest.approx(first.score - first.base_value, abs=1e-6)

    labels = [("enc-60", "malignant"), ("enc-61", "benign")]
    assert service.feedback(labels).recorded == 2
    stored = read_feedback(home)["encounter_hash"].tolist()
    assert stored[-2:] == [hash_encounter_id("enc-60", home), hash_encounter_id("enc-61", home)]

    metadata = service.metadata()
    assert metadata.model_version == version and metadata.data_version == "data-v1"
    assert metadata.features == list(FEATURES)
    assert service.ready() and service.last_model_version == version


def test_a_refused_record_names_its_fields(asgi: TestClient):
    bad = records(3)
    bad[1]["mean_radius"] = 179.9  # micrometres sent for millimetres
    del bad[2]["mean_area"]
    with pytest.raises(ServiceError) as refused:
        client(asgi).predict(bad)
    error = refused.value
    assert error.status == 422 and error.path == "/predict"
    assert error.fields == ["records[1].mean_radius", "records[2].mean_area"]
    assert "out of plausible range" in error.detail[0].reason and "missing feature" in error.detail[1].reason
    with pytest.raises(ServiceError) as refused:
        client(asgi).feedback([("enc-1", "maybe")])
    assert refused.value.status == 422 and refused.value.fields == ["labels[0].diagnosis"]


def test_a_wrong_key_is_a_401(asgi: TestClient, version: str):
    with pytest.raises(ServiceError) as refused:
        client(asgi, key="not-a-key").predict(records(1))
    assert refused.value.status == 401 and refused.value.detail == []
    assert "401" in str(refused.value)
    assert client(asgi, key="not-a-key").last_model_version is None
    assert MedopsClient(URL, http=asgi).ready()  # health routes need no key


def test_connection_failures_are_retried_only_before_sending(monkeypatch: pytest.MonkeyPatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with MedopsClient(closed, API_KEY, connect_retries=2) as service:
        attempts = []
        send = service._http.request
        monkeypatch.setattr(service._http, "request", lambda *a, **k: attempts.append(a) or send(*a, **k))
        with pytest.raises(httpx.ConnectError):
            service.predict(records(1))
        assert len(attempts) == 3  # the first try and two retries
        assert not service.ready()

    def read_timeout(*args: Any, **kwargs: Any) -> httpx.Response:
        attempts.append(args)
        raise httpx.ReadTimeout("sent, no answer")

    with MedopsClient(closed, API_KEY, connect_retries=2) as service:
        attempts = []
        monkeypatch.setattr(service._http, "request", read_timeout)
        with pytest.raises(httpx.ReadTimeout):
            service.predict(records(1))
        assert len(attempts) == 1  # the request may have been served: never sent twice
