"""Property-based checks from the service's own OpenAPI document: no input makes it answer 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from serving_fixtures import API_KEY, records, service_app, serving_home, shared_registry

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OPERATIONS = ["/predict", "/explain", "/feedback", "/metadata"]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tracking_uri, version = shared_registry()
    with (
        serving_home(
            tmp_path_factory.mktemp("schemathesis"),
            MEDOPS_MLFLOW_TRACKING_URI=tracking_uri,
            # the examples are sent back to back with one key: its /explain limit is not what is tested here
            MEDOPS_EXPLAIN_RATE_LIMIT_PER_SECOND="0",
            MEDOPS_EXPLAIN_CONCURRENCY_LIMIT="0",
        ) as home,
        service_app(home, version) as app,
    ):
        yield schemathesis.openapi.from_asgi("/docs.json", app, headers=AUTH)
        from schemathesis.python.asgi import shutdown_lifespans

        shutdown_lifespans()  # the service's lifespan: closes its prediction log


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("path", OPERATIONS)
def test_no_input_makes_the_service_fail(api_schema: Any, path: str, mode: GenerationMode):
    """Generated bodies, valid and invalid, for every operation: any 4xx is fine, a 5xx is a bug."""
    operation = api_schema[path]["POST"]
    statuses: set[int] = set()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case: Any) -> None:
        if mode == GenerationMode.POSITIVE and path == "/feedback" and case.body is not NOT_SET:
            answer_first(api_schema, case.body)  # labels are accepted only for encounters answered
        response = case.call(headers=AUTH)
        statuses.add(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])
        assert "x-model-version" in {name.lower() for name in response.headers}
        if mode == GenerationMode.POSITIVE and case.body is not NOT_SET:  # what the schema allows is served
            assert response.status_code == 200, response.text

    check()
    assert statuses and max(statuses) < 500


def answer_first(api_schema: Any, body: Any) -> None:
    """Predict for the encounters a generated /feedback body labels, as a clinic would have first."""
    encounters = [label["encounter_id"] for label in body.get("labels", []) if isinstance(label, dict)]
    if not encounters:
        return
    rows = records(100)
    predict = api_schema["/predict"]["POST"].Case(
        body={"records": [rows[i % len(rows)] | {"encounter_id": encounter} for i, encounter in enumerate(encounters)]},
        media_type="application/json",
    )
    assert predict.call(headers=AUTH).status_code == 200
