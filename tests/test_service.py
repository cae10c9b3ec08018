"""The service through its ASGI app: auth, validation (422 naming field and reason), limits, headers,
explanations, feedback and the prediction log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serving_fixtures import (
    API_KEY,
    OTHER_KEY,
    auth,
    breast_cancer_frame,
    records,
    service_app,
    serving_home,
    shared_registry,
)
from starlette.testclient import TestClient

from medops.core.settings import Settings
from pipelines.prediction_log import hash_encounter_id, read_feedback, read_predictions
from pipelines.schema import FEATURES


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    tracking_uri, _ = shared_registry()
    with serving_home(
        tmp_path_factory.mktemp("service"),
        MEDOPS_MLFLOW_TRACKING_URI=tracking_uri,
        MEDOPS_MAX_RECORDS="50",
        MEDOPS_MAX_BODY_BYTES="200000",
    ) as settings:
        yield settings


@pytest.fixture(scope="module")
def version(home: Settings) -> str:
    return shared_registry()[1]


@pytest.fixture(scope="module")
def estimator(home: Settings, version: str) -> Any:
    from pipelines.model_registry import load_model

    return load_model(version, home)


@pytest.fixture(scope="module")
def client(home: Settings, version: str) -> Iterator[TestClient]:
    with service_app(home, version) as app, TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def predict(client: TestClient, body: Any, **headers: str):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/predict", content=content, headers={**auth(), "content-type": "application/json", **headers})


def assert_field_error(response, field: str, reason_part: str) -> None:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    matching = [item for item in detail if item["field"] == field]
    assert matching, f"no error for {field}: {detail}"
    assert reason_part in matching[0]["reason"], matching[0]


def test_predict_matches_the_registered_model(client: TestClient, version: str, estimator: Any):
    body = records(5)
    response = predict(client, {"records": body})
    assert response.status_code == 200, response.text
    assert response.headers["x-model-version"] == version
    payload = response.json()
    assert payload["model_name"] == "breast_cancer_diagnosis" and payload["model_version"] == version
    frame = breast_cancer_frame()[list(FEATURES)].iloc[:5]
    expected = estimator.predict_proba(frame)[:, list(estimator.classes_).index("malignant")]
    got = np.array([p["probability_malignant"] for p in payload["predictions"]])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert [p["label"] for p in payload["predictions"]] == list(estimator.predict(frame))
    assert [p["encounter_id"] for p in payload["predictions"]] == [r["encounter_id"] for r in body]


# The API docs (/docs, /docs.json) are open: tests/test_service.py::test_api_docs_open_without_a_key
@pytest.mark.parametrize("path", ["/predict", "/explain", "/feedback", "/metadata", "/model-card", "/schema.json"])
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}, {"Authorization": "Bearer "}],
    ids=["none", "wrong-key", "wrong-scheme", "empty"],
)
def test_every_route_but_health_needs_a_key(client: TestClient, path: str, headers: dict[str, str]):
    response = client.post(path, json={"records": records(1)}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "x-model-version" in response.headers


def test_every_configured_key_works(client: TestClient):
    assert predict(client, {"records": records(1)}, Authorization=f"Bearer {OTHER_KEY}").status_code == 200


# /metrics needs the server's Prometheus multiprocess directory: checked on the real server
@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz"])
def test_health_routes_are_open_and_carry_the_version(client: TestClient, path: str, version: str):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["x-model-version"] == version


def test_missing_feature(client: TestClient):
    record = records(1)[0]
    del record["mean_area"]
    assert_field_error(predict(client, {"records": [record]}), "records[0].mean_area", "missing feature")


def test_wrong_type(client: TestClient):
    record = records(2)[1] | {"mean_texture": "17.5"}
    assert_field_error(predict(client, {"records": [records(1)[0], record]}), "records[1].mean_texture", "wrong type")
    record = records(1)[0] | {"mean_texture": True}
    assert_field_error(predict(client, {"records": [record]}), "records[0].mean_texture", "wrong type")
    record = records(1)[0] | {"encounter_id": 12}
    assert_field_error(predict(client, {"records": [record]}), "records[0].encounter_id", "wrong type")


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinity(client: TestClient, token: str):
    record = json.dumps(records(1)[0] | {"worst_area": 0.0}).replace('"worst_area": 0.0', f'"worst_area": {token}')
    response = predict(client, f'{{"records": [{record}]}}'.encode())
    assert_field_error(response, "records[0].worst_area", "not a finite number")


def test_out_of_plausible_range(client: TestClient):
    record = records(1)[0] | {"mean_radius": 179.9}  # micrometres sent for millimetres, say
    assert_field_error(predict(client, {"records": [record]}), "records[0].mean_radius", "out of plausible range")
    record = records(1)[0] | {"mean_smoothness": -0.1}
    assert_field_error(predict(client, {"records": [record]}), "records[0].mean_smoothness", "out of plausible range")


def test_unknown_fields(client: TestClient):
    record = records(1)[0] | {"patient_name": "Jane Doe"}
    assert_field_error(predict(client, {"records": [record]}), "records[0].patient_name", "unknown field")
    assert_field_error(predict(client, {"records": records(1), "extra": 1}), "extra", "unknown field")


def test_malformed_bodies_are_422_not_500(client: TestClient):
    assert predict(client, b'{"records": [').status_code == 422
    assert predict(client, b"[]").status_code == 422
    assert predict(client, b"").status_code == 422
    assert_field_error(predict(client, {"records": []}), "records", "at least 1")
    assert_field_error(predict(client, {"records": [1]}), "records[0]", "")


def test_too_many_records_is_413(client: TestClient, home: Settings):
    body = {"records": records(1) * (home.max_records + 1)}
    response = predict(client, body)
    assert response.status_code == 413
    assert "at most 50" in response.json()["error"]
    assert predict(client, {"records": records(1) * home.max_records}).status_code == 200


def test_body_over_the_size_limit_is_413(client: TestClient, home: Settings):
    big = b'{"records": [' + b" " * home.max_body_bytes + b"]}"
    assert predict(client, big).status_code == 413

    def chunks():  # streamed without Content-Length
        yield b'{"records": ['
        for _ in range(home.max_body_bytes // 1000 + 1):
            yield b" " * 1000
        yield b"]}"

    response = client.post("/predict", content=chunks(), headers={**auth(), "content-type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize("content_type", ["application/vnd.bentoml+pickle", "text/plain", "multipart/form-data"])
def test_only_json_bodies(client: TestClient, content_type: str):
    response = client.post("/predict", content=b"\x80\x04K\x01.", headers={**auth(), "content-type": content_type})
    assert response.status_code == 415


def test_site_from_record_header_or_default(client: TestClient, home: Settings):
    body = records(3, start=100)
    body[0]["site_id"] = "site-b"
    assert predict(client, {"records": body}, **{"X-Site-Id": "site-h"}).status_code == 200
    assert predict(client, {"records": records(1, start=200)}).status_code == 200
    logged = read_predictions(home)
    hashes = {hash_encounter_id(f"enc-{i}", home): i for i in (100, 101, 102, 200)}
    sites = {hashes[h]: s for h, s in zip(logged["encounter_hash"], logged["site_id"], strict=True) if h in hashes}
    assert sites == {100: "site-b", 101: "site-h", 102: "site-h", 200: "unknown"}
    bad = predict(client, {"records": records(1)}, **{"X-Site-Id": "site h; drop"})
    assert_field_error(bad, "X-Site-Id", "does not match")
    assert_field_error(
        predict(client, {"records": [records(1)[0] | {"site_id": "a,b"}]}), "records[0].site_id", "pattern"
    )


def test_refused_requests_are_counted_per_site_and_field_without_values(client: TestClient, home: Settings):
    from pipelines.prediction_log import read_refusals, site_traffic

    def bad_headers() -> int:
        unknown = site_traffic(read_predictions(home), read_refusals(home)).get("unknown", {})
        return unknown.get("by_field", {}).get("X-Site-Id", {}).get("bad_pattern", 0)

    earlier = bad_headers()  # other tests of this module send bad headers too
    bad = records(3, start=400)
    bad[0]["mean_radius"] = 987.654  # out of range
    bad[1]["worst_area"] = -3.25
    del bad[2]["mean_texture"]
    assert predict(client, {"records": bad}, **{"X-Site-Id": "site-r"}).status_code == 422
    own_site = records(2, start=410)
    own_site[0] |= {"site_id": "site-s", "mean_radius": 987.654}
    assert predict(client, {"records": own_site}, **{"X-Site-Id": "site-r"}).status_code == 422
    assert predict(client, {"records": records(1)}, **{"X-Site-Id": "bad site!"}).status_code == 422
    assert predict(client, {"records": records(2, start=420)}, **{"X-Site-Id": "site-r"}).status_code == 200

    refusals = read_refusals(home)
    traffic = site_traffic(read_predictions(home), refusals)
    assert traffic["site-r"]["refused"] == 4 and traffic["site-r"]["scored"] == 2
    assert traffic["site-r"]["by_field"] == {
        "mean_radius": {"out_of_range": 1},
        "mean_texture": {"missing": 1},
        "worst_area": {"out_of_range": 1},
    }
    assert traffic["site-s"] == {
        "site": "site-s",
        "scored": 0,
        "refused": 1,
        "by_field": {"mean_radius": {"out_of_range": 1}},
    }
    assert bad_headers() == earlier + 1
    text = "".join(path.read_text() for path in (home.predictions_dir / "refusals").glob("refusals-*.csv"))
    assert "987.654" not in text and "-3.25" not in text and "enc-4" not in text


def test_every_served_prediction_is_logged_once_with_hashed_ids(client: TestClient, home: Settings, version: str):
    before = len(read_predictions(home))
    served = 0
    for start in range(300, 330, 3):
        response = predict(client, {"records": records(3, start=start)})
        assert response.status_code == 200
        served += len(response.json()["predictions"])
    assert predict(client, {"records": [records(1)[0] | {"mean_radius": -1}]}).status_code == 422  # not logged
    logged = read_predictions(home)
    assert len(logged) - before == served
    new = logged.iloc[before:]
    assert set(new["model_version"]) == {version}
    assert new["encounter_hash"].str.fullmatch(r"[0-9a-f]{64}").all()
    text = "".join(p.read_text() for p in (home.predictions_dir / "log").glob("*.csv"))
    assert "enc-300" not in text


def test_explain_contributions_add_up_to_score_minus_base(client: TestClient, estimator: Any, version: str):
    body = records(4, start=10)
    response = client.post("/explain", json={"records": body}, headers=auth())
    assert response.status_code == 200, response.text
    assert response.headers["x-model-version"] == version
    payload = response.json()
    assert payload["method"] == "linear-exact"
    frame = breast_cancer_frame()[list(FEATURES)].iloc[10:14]
    probability = estimator.predict_proba(frame)[:, 1]
    for explanation, p in zip(payload["explanations"], probability, strict=True):
        contributions = explanation["contributions"]
        assert list(contributions) == list(FEATURES)
        assert explanation["score_kind"] == "log_odds"
        assert sum(contributions.values()) == pytest.approx(explanation["score"] - explanation["base_value"], abs=1e-9)
        assert 1 / (1 + np.exp(-explanation["score"])) == pytest.approx(p, abs=1e-12)  # the model's own score


def test_explain_through_shap_for_a_non_linear_model(client: TestClient):
    from serving_fixtures import fit_tiny_model
    from sklearn.ensemble import RandomForestClassifier

    import serving.service as service
    from serving.scoring import ServingModel

    forest = fit_tiny_model(classifier=RandomForestClassifier(n_estimators=10, random_state=0))
    served = service.STATE.model
    service.STATE.model = ServingModel.from_estimator("breast_cancer_diagnosis", "99", forest)
    try:
        response = client.post("/explain", json={"records": records(2, start=40)}, headers=auth())
    finally:
        service.STATE.model = served
    assert response.status_code == 200, response.text
    assert response.headers["x-model-version"] == "99"
    payload = response.json()
    assert payload["method"] == "shap-permutation"
    frame = breast_cancer_frame()[list(FEATURES)].iloc[40:42]
    for explanation, p in zip(payload["explanations"], forest.predict_proba(frame)[:, 1], strict=True):
        assert explanation["score_kind"] == "probability"
        assert explanation["score"] == pytest.approx(p, abs=1e-12)
        assert sum(explanation["contributions"].values()) == pytest.approx(
            explanation["score"] - explanation["base_value"], abs=1e-9
        )


def test_feedback_is_stored_hashed(client: TestClient, home: Settings):
    labels = [{"encounter_id": "enc-300", "diagnosis": "malignant"}, {"encounter_id": "enc-301", "diagnosis": "benign"}]
    response = client.post("/feedback", json={"labels": labels}, headers=auth())
    assert response.status_code == 200 and response.json() == {"recorded": 2}
    feedback = read_feedback(home)
    assert feedback["encounter_hash"].tolist()[-2:] == [hash_encounter_id(f"enc-{i}", home) for i in (300, 301)]
    bad = client.post("/feedback", json={"labels": [{"encounter_id": "x", "diagnosis": "maybe"}]}, headers=auth())
    assert_field_error(bad, "labels[0].diagnosis", "")
    assert "x-model-version" in bad.headers


def test_metadata_by_get_and_post(client: TestClient, version: str):
    for response in (client.get("/metadata", headers=auth()), client.post("/metadata", json={}, headers=auth())):
        assert response.status_code == 200, response.text
        meta = response.json()
        assert meta["model_version"] == version and meta["data_version"] == "data-v1"
        assert meta["threshold"] == 0.3 and meta["metrics"]["roc_auc"] == 0.99
        assert meta["trained_at"] and meta["run_id"] and meta["features"] == list(FEATURES)
        assert response.headers["x-model-version"] == version


def test_a_version_built_without_a_model_card_says_so(client: TestClient, version: str):
    """The tiny serving-test model was never trained by medops, so its Bento carries no card."""
    response = client.get("/model-card", headers=auth())
    assert response.status_code == 404
    assert response.json() == {"error": f"model version {version} was built without a model card", "detail": []}
    assert response.headers["x-model-version"] == version


def test_openapi_document_describes_the_contract(client: TestClient):
    spec = client.get("/docs.json", headers=auth()).json()
    assert {"/predict", "/explain", "/feedback", "/metadata"} <= set(spec["paths"])
    record = spec["components"]["schemas"]["Record"]
    assert record["properties"]["mean_radius"]["maximum"] == 60.0
    assert record["additionalProperties"] is False and len(record["required"]) == 30


def test_nothing_written_outside_medops_home(home: Settings):
    assert not (Path.cwd() / "mlruns").exists()


def test_api_docs_example_is_a_real_seed_record_and_fields_state_units(client: TestClient):
    from pipelines.data import seed_frame
    from serving.contract import EXAMPLE_RECORD

    seed = seed_frame()
    row = seed.loc[19]
    assert {name: float(row[name]) for name in FEATURES} == {name: EXAMPLE_RECORD[name] for name in FEATURES}
    assert row["site_id"] == EXAMPLE_RECORD["site_id"]
    spec = client.get("/docs.json").json()
    text = json.dumps(spec)
    assert '"mean_radius": 13.54' in text  # the example, not each feature's maximum
    record = spec["components"]["schemas"]["Record"]["properties"]
    assert "Unit: image units (pixels)" in record["mean_radius"]["description"]
    assert "Plausible range 0 to 60" in record["mean_radius"]["description"]
    assert all("Unit:" in record[name]["description"] for name in FEATURES)
    # and the example the docs show is accepted by the service
    answer = predict(client, {"records": [EXAMPLE_RECORD]})
    assert answer.status_code == 200, answer.text


def test_a_prediction_that_cannot_be_logged_durably_is_not_answered(client: TestClient, home: Settings, monkeypatch):
    """Runs last in this module: it breaks the worker's prediction log on purpose."""
    import os

    assert predict(client, {"records": records(1)}).status_code == 200
    served = len(read_predictions(home))

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    refused = predict(client, {"records": records(2, start=10)})
    assert refused.status_code == 503, refused.text
    assert "prediction log unavailable" in refused.json()["error"]
    assert client.get("/readyz").status_code == 503
    assert predict(client, {"records": records(1)}).status_code == 503
    monkeypatch.undo()
    # what was refused is not claimed as served: the log holds only rows written before the answer
    assert len(read_predictions(home)) <= served + 2


def test_api_docs_open_without_a_key(client: TestClient, version: str):
    from serving.contract import SWAGGER_ASSETS

    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text and 'url: "/docs.json"' in page.text
    for name in SWAGGER_ASSETS:
        assert client.get(f"/docs/{name}").status_code == 200, name
    doc = client.get("/docs.json")
    assert doc.status_code == 200
    spec = doc.json()
    assert spec["info"]["title"] == "medops diagnosis service" and spec["info"]["version"] == version
    assert "BentoML" not in json.dumps(spec["info"])
    assert spec["components"]["securitySchemes"]["bearerKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from MEDOPS_API_KEYS.",
    }
    assert spec["security"] == [{"bearerKey": []}]
    predict_responses = spec["paths"]["/predict"]["post"]["responses"]
    assert set(predict_responses) == {"200", "401", "403", "413", "415", "422", "429", "503"}
    assert spec["paths"]["/readyz"]["get"]["security"] == []
