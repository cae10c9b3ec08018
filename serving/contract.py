"""The HTTP contract of the service as pydantic models, generated from ``pipelines/schema.py``.

The same schema drives ingest validation, so a record the service accepts is a record ingest
would accept: every one of the 30 features is required, must be a finite JSON number inside its
plausible range, and no unknown field is allowed (a patient name, a typo). Strict mode keeps a
number sent as a string or a boolean from being coerced silently.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from pipelines.schema import (
    CLASSES,
    ENCOUNTER,
    FEATURE_RANGES,
    FEATURES,
    SITE,
    SITE_PATTERN,
    feature_description,
)

Diagnosis = Literal[CLASSES]  # type: ignore[valid-type]
SERVICE_NAME = "medops_diagnosis"  # the @bentoml.service name (BentoML config keys use it)
DEFAULT_SITE = "unknown"
SITE_HEADER = "X-Site-Id"
VERSION_HEADER = "X-Model-Version"
ENCOUNTER_MAX_LENGTH = 128

_RECORD_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

EncounterId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=ENCOUNTER_MAX_LENGTH,
        description="The clinical application's id for the encounter; only its keyed hash is logged.",
    ),
]
SiteId = Annotated[str, Field(pattern=SITE_PATTERN, description="Hospital the record comes from.")]


# Row 19 of the seed dataset (a benign case from site-b): the docs show a real record, not each
# feature's maximum (OpenAPI 3.0's singular "example": BentoML's schema model refuses "examples").
# tests/test_service.py checks it is still a seed row.
EXAMPLE_RECORD: dict[str, Any] = {
    "mean_radius": 13.54, "mean_texture": 14.36, "mean_perimeter": 87.46, "mean_area": 566.3,
    "mean_smoothness": 0.09779, "mean_compactness": 0.08129, "mean_concavity": 0.06664,
    "mean_concave_points": 0.04781, "mean_symmetry": 0.1885, "mean_fractal_dimension": 0.05766,
    "radius_error": 0.2699, "texture_error": 0.7886, "perimeter_error": 2.058, "area_error": 23.56,
    "smoothness_error": 0.008462, "compactness_error": 0.0146, "concavity_error": 0.02387,
    "concave_points_error": 0.01315, "symmetry_error": 0.0198, "fractal_dimension_error": 0.0023,
    "worst_radius": 15.11, "worst_texture": 19.26, "worst_perimeter": 99.7, "worst_area": 711.2,
    "worst_smoothness": 0.144, "worst_compactness": 0.1773, "worst_concavity": 0.239,
    "worst_concave_points": 0.1288, "worst_symmetry": 0.2977, "worst_fractal_dimension": 0.07259,
    ENCOUNTER: "enc-2026-000123",
    SITE: "site-b",
}  # fmt: skip


def _feature_field(name: str, low: float, high: float) -> tuple[Any, Any]:
    field = Field(
        ge=low, le=high, description=feature_description(name), json_schema_extra={"example": EXAMPLE_RECORD[name]}
    )
    return (Annotated[float, field], ...)


Record = create_model(
    "Record",
    __config__=_RECORD_CONFIG,
    __doc__="One patient's 30 tumour features, optionally with an encounter id and a site id.",
    **{name: _feature_field(name, *FEATURE_RANGES[name]) for name in FEATURES},
    **{ENCOUNTER: (EncounterId | None, None), SITE: (SiteId | None, None)},
)


class PredictRequest(BaseModel):
    """Records to score (``/predict``) or explain (``/explain``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"records": [EXAMPLE_RECORD]}})
    records: list[Record] = Field(min_length=1)  # type: ignore[valid-type]


class Prediction(BaseModel):
    label: Diagnosis
    probability_malignant: float
    encounter_id: str | None = None


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[Prediction]


class Explanation(BaseModel):
    """How each feature moved one record's score from the base value: ``sum(contributions.values()) ==
    score - base_value``; ``score`` is the log-odds of malignancy (linear, exact) or its probability (shap)."""

    encounter_id: str | None = None
    label: Diagnosis
    probability_malignant: float
    score: float
    base_value: float
    score_kind: Literal["log_odds", "probability"]
    contributions: dict[str, float]


class ExplainResponse(BaseModel):
    model_name: str
    model_version: str
    method: str
    explanations: list[Explanation]


class FeedbackLabel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    encounter_id: EncounterId
    diagnosis: Diagnosis


class FeedbackRequest(BaseModel):
    """Ground truth for earlier predictions, joined to them through the encounter id's hash."""

    model_config = ConfigDict(extra="forbid")
    labels: list[FeedbackLabel] = Field(min_length=1)


class FeedbackResponse(BaseModel):
    recorded: int


class MetadataRequest(BaseModel):
    """``/metadata`` takes no input (GET, or POST with ``{}``)."""

    model_config = ConfigDict(extra="forbid")


class ModelMetadata(BaseModel):
    model_name: str
    model_version: str
    data_version: str | None = None
    threshold: float | None = None
    trained_at: str | None = None
    run_id: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    features: list[str] = Field(default_factory=lambda: list(FEATURES))
    bento: str | None = None
    explain_method: str | None = None


class ErrorDetail(BaseModel):
    """One field at fault in an error body (``{"error": ..., "detail": [...]}``, every 4xx) and why."""

    field: str
    reason: str
    type: str


# API docs for app developers ------------------------------------------------------------------------
# Docs are not patient data: these paths answer without a key (serving/middleware.py's open paths).
# The page is BentoML's bundled Swagger UI; requests sent from it still need the bearer key.
SWAGGER_ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js")
DOCS_PATHS = frozenset({"/docs", "/docs.json", *(f"/docs/{name}" for name in SWAGGER_ASSETS)})

_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "What went wrong, in one line."},
        "detail": {
            "type": "array",
            "items": {"type": "object", "properties": {"field": {"type": "string"}, "reason": {"type": "string"}}},
            "description": "Each field at fault and why (422).",
        },
    },
}
ERROR_RESPONSES: dict[str, str] = {
    "401": "Missing or wrong bearer key.",
    "403": "The key may not use this route.",
    "413": "Too many records or too large a body.",
    "415": "The body is not JSON (send Content-Type: application/json).",
    "422": "A record is invalid: the field and the reason (missing feature, wrong type, NaN, out of range, unknown).",
    "429": "Over the key's rate or concurrency limit; retry after the Retry-After header's seconds.",
    "503": "The prediction could not be logged durably, so it is not answered; retry later.",
}


def openapi_document(spec: dict[str, Any], model_version: str) -> dict[str, Any]:
    """BentoML's generated OpenAPI document, told the truth: medops' title and contact, the bearer
    scheme every API route needs, and the responses the service really gives."""
    doc = dict(spec)
    doc["info"] = {
        "title": "medops diagnosis service",
        "version": model_version,
        "description": (
            "Breast cancer diagnosis support: the probability that a breast mass is malignant from 30 "
            "fine-needle aspirate features, and the label at the model's validated threshold. Every API "
            "route needs `Authorization: Bearer <key>` (use **Authorize**); health routes and these docs do not."
        ),
        "contact": {"name": "medops ML platform team"},
    }
    components = dict(doc.get("components") or {})
    components["securitySchemes"] = {
        "bearerKey": {"type": "http", "scheme": "bearer", "description": "An API key from MEDOPS_API_KEYS."}
    }
    components["schemas"] = {**(components.get("schemas") or {}), "Error": _ERROR_SCHEMA}
    doc["components"] = components
    doc["security"] = [{"bearerKey": []}]
    doc["paths"] = {
        path: {method: _operation(path, dict(op)) for method, op in operations.items()}
        for path, operations in (doc.get("paths") or {}).items()
        if path not in DOCS_PATHS and path != "/"
    }
    return doc


def _operation(path: str, operation: dict[str, Any]) -> dict[str, Any]:
    responses = {str(code): value for code, value in (operation.get("responses") or {}).items() if str(code)[0] == "2"}
    if path in ("/livez", "/readyz", "/healthz", "/metrics"):
        operation["security"] = []
        operation["responses"] = responses or {"200": {"description": "OK"}}
        return operation
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    codes = ERROR_RESPONSES if path in ("/predict", "/explain", "/feedback") else {"401": ERROR_RESPONSES["401"]}
    responses.update({code: {"description": text, "content": error} for code, text in codes.items()})
    operation["responses"] = responses
    return operation
