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
from serving_fixtures import API_KEY, service_app, serving_home, shared_registry

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OPERATIONS = ["/predict", "/explain", "/feedback", "/metadata"]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tracking_uri, version = shared_registry()
    with (
        serving_home(tmp_path_factory.mktemp("schemathesis"), MEDOPS_MLFLOW_TRACKING_URI=tracking_uri) as home,
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
        response = case.call(headers=AUTH)
        statuses.add(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])
        assert "x-model-version" in {name.lower() for name in response.headers}
        if mode == GenerationMode.POSITIVE and case.body is not NOT_SET:  # what the schema allows is served
            assert response.status_code == 200, response.text

    check()
    assert statuses and max(statuses) < 500
