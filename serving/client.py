"""A typed client for clinical applications: the service's contract as Python calls.

    with MedopsClient("http://127.0.0.1:3000", api_key=key, site_id="site-a") as client:
        result = client.predict([{"mean_radius": 17.99, ..., "encounter_id": "enc-1"}])
        result.predictions[0].label, result.predictions[0].probability_malignant
        client.last_model_version  # the X-Model-Version the answer carried

Requests and responses are the pydantic models of :mod:`serving.contract`; a refused request raises
:class:`ServiceError`. Only connection failures before anything was sent are retried (nothing can
have been served or logged twice). The rollout's smoke test and the simulated clinical app use it too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from serving.contract import (
    SITE_HEADER,
    VERSION_HEADER,
    ErrorDetail,
    ExplainResponse,
    FeedbackResponse,
    ModelMetadata,
    PredictResponse,
)

REQUEST_ID_HEADER = "X-Request-Id"
# httpx raises these only when no connection was made, so no request can have reached the service.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)

ResponseModel = TypeVar("ResponseModel", bound=BaseModel)


class ServiceError(RuntimeError):
    """The service refused a request (4xx) or failed (5xx); for a 422, ``detail`` holds one
    :class:`~serving.contract.ErrorDetail` per field the service named (``records[3].mean_radius``)."""

    def __init__(
        self,
        status: int,
        message: str,
        detail: list[ErrorDetail] | None = None,
        *,
        path: str = "",
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{path + ' ' if path else ''}{status}: {message}")
        self.status = status
        self.message = message
        self.detail = detail or []
        self.path = path
        self.request_id = request_id

    @property
    def fields(self) -> list[str]:
        """The fields the service named, in its order."""
        return [item.field for item in self.detail]


def _records(records: Iterable[BaseModel | Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        record.model_dump(exclude_none=True) if isinstance(record, BaseModel) else dict(record) for record in records
    ]


def _error(response: httpx.Response, path: str) -> ServiceError:
    """The service's error body (``{"error", "detail": [{field, reason, type}]}``) as a ServiceError."""
    message, detail = response.text, []
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = str(body.get("error") or response.text)
        for item in body.get("detail") or []:
            try:
                detail.append(ErrorDetail.model_validate(item))
            except ValidationError:
                continue  # an item without field and reason names nothing the caller can act on
    return ServiceError(
        response.status_code, message, detail, path=path, request_id=response.headers.get(REQUEST_ID_HEADER)
    )


class MedopsClient:
    """Synchronous client of the medops diagnosis service (keep-alive connections, bearer auth).

    ``site_id`` goes out as ``X-Site-Id`` (records naming their own site keep it); ``api_key`` may be
    omitted for the open health routes (:meth:`ready`); ``http`` is an httpx client of the caller's own
    (Starlette's ``TestClient`` around the ASGI app), left open on :meth:`close`; ``verify`` is httpx's.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        site_id: str | None = None,
        timeout: float = 30.0,
        connect_retries: int = 3,
        http: httpx.Client | None = None,
        verify: Any = True,
    ) -> None:
        self.url = url.rstrip("/")
        self._headers: dict[str, str] = {}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        if site_id:
            self._headers[SITE_HEADER] = site_id
        self._own_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=timeout, verify=verify)
        self.connect_retries = connect_retries
        self.last_model_version: str | None = None
        self.last_request_id: str | None = None

    def __enter__(self) -> MedopsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def _request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        retrying = Retrying(
            retry=retry_if_exception_type(NOT_SENT),
            stop=stop_after_attempt(self.connect_retries + 1),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            reraise=True,
        )
        response = retrying(self._http.request, method, f"{self.url}{path}", json=json, headers=self._headers)
        self.last_model_version = response.headers.get(VERSION_HEADER)
        self.last_request_id = response.headers.get(REQUEST_ID_HEADER)
        return response

    def _send(self, method: str, path: str, json: Any, model: type[ResponseModel]) -> ResponseModel:
        response = self._request(method, path, json)
        if response.status_code >= 400:
            raise _error(response, path)
        return model.model_validate_json(response.content)

    def predict(self, records: Iterable[BaseModel | Mapping[str, Any]]) -> PredictResponse:
        """Probability of malignancy and label per record (30 features, optional encounter/site id)."""
        return self._send("POST", "/predict", {"records": _records(records)}, PredictResponse)

    def explain(self, records: Iterable[BaseModel | Mapping[str, Any]]) -> ExplainResponse:
        """Per-feature contributions to each record's score."""
        return self._send("POST", "/explain", {"records": _records(records)}, ExplainResponse)

    def feedback(self, labels: Iterable[tuple[str, str]]) -> FeedbackResponse:
        """Ground truth as ``(encounter_id, "malignant" | "benign")`` pairs."""
        body = {"labels": [{"encounter_id": encounter, "diagnosis": diagnosis} for encounter, diagnosis in labels]}
        return self._send("POST", "/feedback", body, FeedbackResponse)

    def metadata(self) -> ModelMetadata:
        """Name, version, data version, training time and evaluation metrics of the served model."""
        return self._send("GET", "/metadata", None, ModelMetadata)

    def ready(self) -> bool:
        """Whether ``/readyz`` answers 200; its model version is then in :attr:`last_model_version`."""
        try:
            return self._request("GET", "/readyz").status_code == 200
        except httpx.HTTPError:
            self.last_model_version = self.last_request_id = None
            return False
