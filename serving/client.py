"""A typed client for clinical applications: the service's contract as Python calls.

    with MedopsClient("http://127.0.0.1:3000", api_key=key) as client:
        result = client.predict([{"mean_radius": 17.99, ..., "encounter_id": "enc-1"}])
        result.predictions[0].label, result.predictions[0].probability_malignant

Requests and responses are the pydantic models of :mod:`serving.contract`. A refused request
raises :class:`ServiceError` with the HTTP status and the fields the service named. Connection
failures before anything was sent are retried briefly (nothing can have been served or logged
twice); nothing else is retried.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from serving.contract import (
    SITE_HEADER,
    VERSION_HEADER,
    ErrorDetail,
    ExplainResponse,
    FeedbackResponse,
    ModelMetadata,
    PredictResponse,
)

ResponseModel = TypeVar("ResponseModel", bound=BaseModel)


class ServiceError(RuntimeError):
    """The service refused a request (4xx) or failed (5xx)."""

    def __init__(self, status: int, message: str, detail: list[ErrorDetail] | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.detail = detail or []


def _records(records: Iterable[BaseModel | Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        record.model_dump(exclude_none=True) if isinstance(record, BaseModel) else dict(record) for record in records
    ]


class MedopsClient:
    """Synchronous client of the medops diagnosis service (keep-alive connections, bearer auth)."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        site_id: str | None = None,
        timeout: float = 30.0,
        connect_retries: int = 3,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"}
        if site_id:
            headers[SITE_HEADER] = site_id
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.connect_retries = connect_retries
        self.last_model_version: str | None = None

    def __enter__(self) -> MedopsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, json: Any, model: type[ResponseModel]) -> ResponseModel:
        for attempt in range(self.connect_retries + 1):
            try:
                response = self._http.request(method, path, json=json)
                break
            except httpx.ConnectError:
                if attempt == self.connect_retries:
                    raise
                time.sleep(0.1 * 2**attempt)
        self.last_model_version = response.headers.get(VERSION_HEADER)
        if response.status_code >= 400:
            try:
                body = response.json()
                message = str(body.get("error", response.text))
                detail = [ErrorDetail(**item) for item in body.get("detail", [])]
            except (ValueError, TypeError, AttributeError):
                message, detail = response.text, []
            raise ServiceError(response.status_code, message, detail)
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
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False
