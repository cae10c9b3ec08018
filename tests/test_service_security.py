"""Every door of the service through its ASGI app: scoped keys (403), site binding, the smoke-test
site, feedback only for a site's own encounters, keys created and revoked without a restart, 429
with Retry-After, X-Request-Id on every response, and an access log line for every request, refused
ones included, that holds no feature value and no identifier."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serving_fixtures import API_KEY, auth, records, service_app, serving_home, shared_registry
from starlette.testclient import TestClient

from medops.core.settings import Settings
from pipelines.prediction_log import SMOKE_TEST_SITE, hash_encounter_id, read_feedback, read_predictions
from serving import keys
from serving.keys import RELOAD_SECONDS


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    tracking_uri, _ = shared_registry()
    with serving_home(
        tmp_path_factory.mktemp("security"),
        MEDOPS_MLFLOW_TRACKING_URI=tracking_uri,
        MEDOPS_MAX_BODY_BYTES="200000",
        MEDOPS_EXPLAIN_RATE_LIMIT_PER_SECOND="0.5",
        MEDOPS_EXPLAIN_RATE_LIMIT_BURST="2",
    ) as settings:
        yield settings


@pytest.fixture(scope="module")
def issued(home: Settings) -> dict[str, str]:
    """Keys made before the service's first request (a running service would see them within a second)."""
    made = {
        "predict_only": keys.create_key(home, ["predict"], name="reader")[1],
        "site_a": keys.create_key(home, ["predict", "feedback"], site_id="site-a", name="hospital a")[1],
        "site_b": keys.create_key(home, ["predict", "feedback"], site_id="site-b", name="hospital b")[1],
        "explainer": keys.create_key(home, ["explain"], name="explainer")[1],
    }
    made["rollout"] = keys.rollout_key(home)
    return made


@pytest.fixture(scope="module")
def client(home: Settings, issued: dict[str, str]) -> Iterator[TestClient]:
    with service_app(home, shared_registry()[1]) as app, TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def post(client: TestClient, path: str, body: Any, key: str = API_KEY, **headers: str):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, headers={**auth(key), "content-type": "application/json", **headers})


def field_of(response) -> list[str]:
    return [item["field"] for item in response.json()["detail"]]


def logged_sites(home: Settings, encounters: list[str]) -> dict[str, str]:
    logged = read_predictions(home, include_smoke_tests=True)
    by_hash = {hash_encounter_id(encounter, home): encounter for encounter in encounters}
    return {by_hash[h]: s for h, s in zip(logged["encounter_hash"], logged["site_id"], strict=True) if h in by_hash}


def access_lines(home: Settings) -> list[dict[str, Any]]:
    path = home.run_dir / f"access-{os.getpid()}.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


# scopes ---------------------------------------------------------------------------------------------


def test_a_key_without_the_routes_scope_is_a_403(client: TestClient, issued: dict[str, str]):
    reader = issued["predict_only"]
    assert post(client, "/predict", {"records": records(1)}, reader).status_code == 200
    for path, body in (("/explain", {"records": records(1)}), ("/feedback", {"labels": []})):
        refused = post(client, path, body, reader)
        assert refused.status_code == 403, refused.text
        assert f"may not call {path}" in refused.json()["error"] and "predict" in refused.json()["error"]
    assert client.get("/metadata", headers=auth(reader)).status_code == 200  # any valid key reads metadata
    explainer = issued["explainer"]
    assert post(client, "/predict", {"records": records(1)}, explainer).status_code == 403
    assert post(client, "/explain", {"records": records(1)}, explainer).status_code == 200


def test_unscoped_keys_from_medops_api_keys_keep_every_scope(client: TestClient):
    for path, body in (("/predict", {"records": records(1, start=400)}), ("/explain", {"records": records(1)})):
        assert post(client, path, body).status_code == 200


# sites ----------------------------------------------------------------------------------------------


def test_a_bound_key_speaks_for_its_site_only(client: TestClient, home: Settings, issued: dict[str, str]):
    site_a = issued["site_a"]
    assert post(client, "/predict", {"records": records(2, start=410)}, site_a).status_code == 200
    assert (
        post(client, "/predict", {"records": records(1, start=412)}, site_a, **{"X-Site-Id": "site-a"}).status_code
        == 200
    )
    assert logged_sites(home, ["enc-410", "enc-411", "enc-412"]) == dict.fromkeys(
        ["enc-410", "enc-411", "enc-412"], "site-a"
    )

    other_header = post(client, "/predict", {"records": records(1, start=413)}, site_a, **{"X-Site-Id": "site-b"})
    assert other_header.status_code == 403 and field_of(other_header) == ["X-Site-Id"]
    assert "bound to site site-a" in other_header.json()["detail"][0]["reason"]
    body = records(3, start=414)
    body[2]["site_id"] = "site-b"
    other_record = post(client, "/predict", {"records": body}, site_a)
    assert other_record.status_code == 403 and field_of(other_record) == ["records[2].site_id"]
    smoke = post(client, "/predict", {"records": records(1, start=417)}, site_a, **{"X-Site-Id": SMOKE_TEST_SITE})
    assert smoke.status_code == 403 and field_of(smoke) == ["X-Site-Id"]
    assert logged_sites(home, [f"enc-{i}" for i in range(413, 418)]) == {}  # nothing refused was logged


def test_only_the_rollouts_key_may_claim_the_smoke_test_site(client: TestClient, home: Settings, issued):
    header = post(client, "/predict", {"records": records(1, start=420)}, **{"X-Site-Id": SMOKE_TEST_SITE})
    assert header.status_code == 403 and "reserved" in header.json()["detail"][0]["reason"]
    body = [records(1, start=421)[0] | {"site_id": SMOKE_TEST_SITE}]
    assert field_of(post(client, "/predict", {"records": body})) == ["records[0].site_id"]
    # a JSON escape spells the same field for the parser: it must not slip past the check
    sneaky = json.dumps({"records": body}).replace('"site_id"', '"site\\u005fid"').encode()
    assert post(client, "/predict", sneaky).status_code == 403
    assert logged_sites(home, ["enc-420", "enc-421"]) == {}

    rollout = post(client, "/predict", {"records": records(1, start=422)}, issued["rollout"])
    assert rollout.status_code == 200
    assert logged_sites(home, ["enc-422"]) == {"enc-422": SMOKE_TEST_SITE}
    with pytest.raises(keys.KeyCommandError, match="reserved"):
        keys.create_key(home, ["predict"], site_id=SMOKE_TEST_SITE)


def test_feedback_only_for_encounters_answered_for_the_same_site(client: TestClient, home: Settings, issued):
    site_a, site_b = issued["site_a"], issued["site_b"]
    assert post(client, "/predict", {"records": records(2, start=430)}, site_a).status_code == 200
    before = len(read_feedback(home))

    labels = {"labels": [{"encounter_id": "enc-430", "diagnosis": "malignant"}]}
    stolen = post(client, "/feedback", labels, site_b)
    assert stolen.status_code == 422, stolen.text
    assert field_of(stolen) == ["labels[0].encounter_id"]
    assert "no prediction was served for this encounter to site site-b" in stolen.json()["error"]
    never = post(client, "/feedback", {"labels": [{"encounter_id": "enc-never-seen", "diagnosis": "benign"}]}, site_a)
    assert never.status_code == 422 and field_of(never) == ["labels[0].encounter_id"]
    mixed = {
        "labels": [{"encounter_id": "enc-431", "diagnosis": "benign"}, labels["labels"][0] | {"encounter_id": "x"}]
    }
    assert field_of(post(client, "/feedback", mixed, site_a)) == ["labels[1].encounter_id"]  # all or nothing
    assert len(read_feedback(home)) == before

    own = {
        "labels": [
            {"encounter_id": "enc-430", "diagnosis": "malignant"},
            {"encounter_id": "enc-431", "diagnosis": "benign"},
        ]
    }
    assert post(client, "/feedback", own, site_a).json() == {"recorded": 2}
    assert len(read_feedback(home)) == before + 2

    # a key bound to no site speaks for the site it names in X-Site-Id, else for every site but the smoke test's
    assert post(client, "/predict", {"records": records(1, start=435)}, issued["rollout"]).status_code == 200
    one = {"labels": [{"encounter_id": "enc-431", "diagnosis": "benign"}]}
    assert field_of(post(client, "/feedback", one, **{"X-Site-Id": "site-b"})) == ["labels[0].encounter_id"]
    smoke = {"labels": [{"encounter_id": "enc-435", "diagnosis": "benign"}]}
    assert field_of(post(client, "/feedback", smoke)) == ["labels[0].encounter_id"]
    assert post(client, "/feedback", one).json() == {"recorded": 1}
    assert post(client, "/feedback", one, **{"X-Site-Id": "site-a"}).json() == {"recorded": 1}


def test_feedback_falls_back_to_the_log_files_for_other_workers_answers(home: Settings, tmp_path: Path):
    """A label reaching a worker that did not answer the encounter: found in the other workers' log files."""
    from datetime import UTC, datetime, timedelta

    import numpy as np

    from pipelines.prediction_log import PredictionLogWriter, predictions_log_dir
    from pipelines.schema import FEATURES

    settings = Settings(home=tmp_path / "home", api_keys="k")
    answering = PredictionLogWriter(settings)
    answering.log_predictions(
        request_id="r1",
        model_name="m",
        model_version="1",
        site_ids=["site-a", "site-b", SMOKE_TEST_SITE],
        encounter_ids=["enc-1", "enc-2", "smoke-1"],
        features=np.ones((3, len(FEATURES))),
        probabilities=np.array([0.1, 0.9, 0.2]),
        labels=["benign", "malignant", "benign"],
    )
    answering.close()
    other = PredictionLogWriter(settings)  # another worker: nothing in its memory
    digests = [other.hash_encounter(e) for e in ("enc-1", "enc-2", "enc-3", "smoke-1")]
    assert other.unanswered("site-a", digests) == [1, 2, 3]
    assert other.unanswered("site-b", digests) == [0, 2, 3]
    assert other.served.answered("site-a", digests[0])  # found once, remembered
    assert PredictionLogWriter(settings).unanswered(None, digests) == [2, 3]  # any site but the smoke test's

    # answers older than the lookback are not looked for
    log_dir = predictions_log_dir(settings)
    old_day = (datetime.now(UTC) - timedelta(days=settings.feedback_lookback_days + 2)).strftime("%Y%m%d")
    for path in log_dir.glob("predictions-*.csv"):
        path.rename(log_dir / f"predictions-{old_day}-{path.name.split('-')[-1]}")
    assert PredictionLogWriter(settings).unanswered("site-a", digests) == [0, 1, 2, 3]
    other.close()


# keys without a restart -----------------------------------------------------------------------------


def _medops(*args: str) -> Any:
    from typer.testing import CliRunner

    from medops.app.cli import app

    umask = os.umask(0o022)
    os.umask(umask)
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        os.umask(umask)


def test_keys_created_listed_and_revoked_without_a_restart(client: TestClient, home: Settings):
    created = _medops("keys", "create", "--scope", "predict", "--scope", "feedback", "--site", "site-c", "--json")
    assert created.exit_code == 0, created.output
    made = json.loads(created.output)
    secret, key_id = made["key"], made["id"]
    assert made["scopes"] == ["feedback", "predict"] and made["site_id"] == "site-c"
    time.sleep(RELOAD_SECONDS + 0.1)
    assert post(client, "/predict", {"records": records(1, start=440)}, secret).status_code == 200

    listed = _medops("keys", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {row["id"]: row for row in json.loads(listed.output)["keys"]}
    assert rows[key_id]["site_id"] == "site-c" and rows[key_id]["revoked_at"] is None
    stored = home.api_keys_file.read_text()
    assert secret not in listed.output and secret not in stored  # hashes only
    assert keys.hash_key(secret) in stored and keys.hash_key(secret) not in listed.output
    assert oct(home.api_keys_file.stat().st_mode & 0o777) == "0o600"

    revoked = _medops("keys", "revoke", key_id)
    assert revoked.exit_code == 0, revoked.output
    time.sleep(RELOAD_SECONDS + 0.1)
    assert post(client, "/predict", {"records": records(1, start=441)}, secret).status_code == 401
    assert _medops("keys", "revoke", "no-such-key").exit_code == 1
    bad_scope = _medops("keys", "create", "--scope", "everything")
    assert bad_scope.exit_code == 1 and "unknown scope" in bad_scope.output


# limits ---------------------------------------------------------------------------------------------


def test_a_burst_over_the_explain_limit_gets_429_with_retry_after(client: TestClient, home: Settings, issued):
    """Explain: 0.5 requests/s, burst 2 (this module's settings); another key keeps its own budget."""
    time.sleep(4)  # earlier tests' explanations have been paid back
    answers = [post(client, "/explain", {"records": records(1)}, issued["explainer"]) for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 429, 429, 429]
    refused = answers[2]
    assert refused.headers["retry-after"] == "2"
    assert "requests per second" in refused.json()["error"]
    assert post(client, "/explain", {"records": records(1)}).status_code == 200  # MEDOPS_API_KEYS' own bucket
    assert post(client, "/predict", {"records": records(1)}, issued["site_a"]).status_code == 200
    logged = {line["request_id"]: line for line in access_lines(home)}
    assert [logged[a.headers["x-request-id"]]["status"] for a in answers] == [200, 200, 429, 429, 429]


def test_the_concurrency_limit_refuses_until_a_request_finishes():
    from serving.access import Limiter, Limits

    now = [0.0]
    limiter = Limiter(Limits(0, 1, 3), Limits(1.0, 2, 2), clock=lambda: now[0])
    assert limiter.admit("k", "/explain") is None and limiter.admit("k", "/explain") is None
    why, wait = limiter.admit("k", "/explain")
    assert "2 requests of this key in progress" in why and wait == 1
    assert limiter.admit("other", "/explain") is None  # per key
    limiter.release("k", "/explain")
    now[0] = 0.4  # a slot is free, but the bucket (2 taken, +0.4) is short of a token
    why, wait = limiter.admit("k", "/explain")
    assert "requests per second" in why and wait == 1
    now[0] = 1.0
    assert limiter.admit("k", "/explain") is None
    for _ in range(3):
        assert limiter.admit("k", "/predict") is None  # no rate limit, 3 at once
    assert limiter.admit("k", "/predict") is not None


# request ids and the access log ----------------------------------------------------------------------


def test_every_response_carries_a_request_id_and_the_log_the_same(client: TestClient, home: Settings):
    responses = [
        client.get("/livez"),
        client.get("/readyz"),
        client.post("/predict", json={"records": records(1)}),  # 401
        post(client, "/predict", {"records": [records(1)[0] | {"mean_radius": -1}]}),  # 422
        post(client, "/predict", b"x" * 300_000),  # 413
        client.get("/metadata", headers=auth()),
        client.get("/no-such-route", headers=auth()),
    ]
    ids = [response.headers.get("x-request-id") for response in responses]
    assert all(ids) and len(set(ids)) == len(ids), ids

    chosen = post(client, "/predict", {"records": records(1, start=450)}, **{"X-Request-Id": "clinic-app.7f3a-001"})
    assert chosen.headers["x-request-id"] == "clinic-app.7f3a-001"
    logged = read_predictions(home)
    row = logged[logged["encounter_hash"] == hash_encounter_id("enc-450", home)]
    assert row["request_id"].tolist() == ["clinic-app.7f3a-001"]  # one id: answer, prediction log, access log
    for unsafe in ("a,b", "x" * 65, "enc 1"):
        replaced = post(client, "/predict", {"records": records(1)}, **{"X-Request-Id": unsafe})
        assert replaced.status_code == 200 and replaced.headers["x-request-id"] != unsafe
        assert len(replaced.headers["x-request-id"]) == 32


def test_refused_requests_are_in_the_access_log_without_values_or_ids(client: TestClient, home: Settings, issued):
    body = records(2, start=460)
    sent = {
        401: post(client, "/predict", {"records": body}, "not-a-key"),
        403: post(client, "/explain", {"records": body}, issued["predict_only"]),
        413: post(client, "/predict", b"{" + b" " * 300_000),
        415: client.post("/predict", content=b"a=1", headers={**auth(), "content-type": "text/plain"}),
        422: post(client, "/predict", {"records": [body[0] | {"mean_radius": -1}]}),
        200: post(client, "/predict", {"records": body}, issued["site_a"]),
    }
    time.sleep(0.1)
    lines = {line["request_id"]: line for line in access_lines(home)}
    for status, response in sent.items():
        assert response.status_code == status, (status, response.text)
        line = lines[response.headers["x-request-id"]]
        assert line["status"] == status and line["route"] in ("/predict", "/explain")
        assert line["duration_ms"] >= 0 and line["method"] == "POST" and line["time"]
    ids = {key.name: key.id for key in keys.read_keys(home)}
    assert lines[sent[401].headers["x-request-id"]]["key_id"] is None
    assert lines[sent[403].headers["x-request-id"]]["key_id"] == ids["reader"]
    assert lines[sent[415].headers["x-request-id"]]["key_id"].startswith("env-")  # MEDOPS_API_KEYS' key, by id
    served = lines[sent[200].headers["x-request-id"]]
    assert served["records"] == 2 and served["site"] == "site-a" and served["key_id"] == ids["hospital a"]
    text = (home.run_dir / f"access-{os.getpid()}.log").read_text()
    assert "enc-46" not in text and "enc-4" not in text  # no encounter id
    assert str(body[0]["mean_radius"]) not in text and str(body[0]["worst_area"]) not in text  # no feature value
    assert API_KEY not in text and issued["site_a"] not in text  # no key
    client.get("/predict/enc-470", headers=auth())  # an identifier in a path is not logged either
    assert "enc-470" not in (home.run_dir / f"access-{os.getpid()}.log").read_text()
