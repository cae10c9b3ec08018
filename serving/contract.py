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


def _feature_field(name: str, low: float, high: float) -> tuple[Any, Any]:
    return (
        Annotated[float, Field(ge=low, le=high, description=f"{name}, plausible range [{low}, {high}]")],
        ...,
    )


Record = create_model(
    "Record",
    __config__=_RECORD_CONFIG,
    __doc__="One patient's 30 tumour features, optionally with an encounter id and a site id.",
    **{name: _feature_field(name, *FEATURE_RANGES[name]) for name in FEATURES},
    **{ENCOUNTER: (EncounterId | None, None), SITE: (SiteId | None, None)},
)


class PredictRequest(BaseModel):
    """Records to score (``/predict``) or explain (``/explain``)."""

    model_config = ConfigDict(extra="forbid")
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
    """How each feature moved one record's score away from the model's base value.

    ``sum(contributions.values()) == score - base_value`` (up to rounding); ``score_kind`` says
    whether ``score`` is the log-odds of malignancy (linear models, exact) or its probability (shap).
    """

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
    field: str
    reason: str
    type: str


class ErrorResponse(BaseModel):
    """Body of every 4xx answer: what went wrong and, for 422, which field and why."""

    error: str
    detail: list[ErrorDetail] = Field(default_factory=list)
