"""The baseline: the same MLflow model served the straightforward way with FastAPI and uvicorn.

A pydantic request model with the thirty features, the records turned into a pandas DataFrame,
``predict_proba`` of the estimator ``mlflow.sklearn.load_model`` returns, the label from the
model's own operating threshold, a pydantic response model. No authentication and no prediction
log: the medops service does more work per request than this app and is still compared with it.

Configured by environment: ``MEDOPS_HOME`` (the MLflow store) and ``BENCH_MODEL_VERSION``.
"""

from __future__ import annotations

import os

import pandas as pd
from fastapi import FastAPI
from pydantic import BaseModel, create_model

from medops.core.settings import get_settings
from pipelines.model_registry import load_model
from pipelines.schema import FEATURES, NEGATIVE, POSITIVE

Record = create_model("Record", encounter_id=(str | None, None), **{name: (float, ...) for name in FEATURES})


class PredictRequest(BaseModel):
    records: list[Record]  # type: ignore[valid-type]


class Prediction(BaseModel):
    label: str
    probability_malignant: float
    encounter_id: str | None = None


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[Prediction]


settings = get_settings()
MODEL_VERSION = os.environ["BENCH_MODEL_VERSION"]
model = load_model(MODEL_VERSION, settings)
POSITIVE_COLUMN = list(model.classes_).index(POSITIVE)
THRESHOLD = float(getattr(model, "threshold", 0.5))
app = FastAPI()


@app.post("/predict", response_model=PredictResponse)
def predict(request: PredictRequest) -> PredictResponse:
    frame = pd.DataFrame([record.model_dump(exclude={"encounter_id"}) for record in request.records])
    probabilities = model.predict_proba(frame[list(FEATURES)])[:, POSITIVE_COLUMN]
    return PredictResponse(
        model_name=settings.model_name,
        model_version=MODEL_VERSION,
        predictions=[
            Prediction(
                label=POSITIVE if probability >= THRESHOLD else NEGATIVE,
                probability_malignant=float(probability),
                encounter_id=record.encounter_id,
            )
            for record, probability in zip(request.records, probabilities, strict=True)
        ],
    )


@app.get("/readyz")
def readyz() -> dict:
    return {"ready": True}
