"""The BentoML service clinical applications call: ``/predict``, ``/explain``, ``/feedback``, ``/metadata``,
``/model-card``.

The model is declared at class scope by its registry version: a Bento is built for one champion
version (``bentoml build --arg model_version=N``, see ``serving/rollout.py``) and imports exactly
that BentoML model, ``<model_name>:<N>``, never ``:latest``. Outside a Bento (tests, ``bentoml
serve serving.service:MedopsService``) the version comes from ``--arg model_version=N`` or the
``MEDOPS_SERVING_MODEL_VERSION`` variable.

Hot path of ``/predict``: pydantic validation straight from the JSON bytes (BentoML), records to a
numpy array, the verified numpy form of the model, one write to the prediction log (fsynced by a
group commit), and a response validated by pydantic-core from plain dicts. It is an async method,
so no thread hop per request. See the Serving section of ``README.md`` for what else was cut and why.
"""

from __future__ import annotations

import gc
import logging
import os
from http import HTTPStatus
from operator import attrgetter
from pathlib import Path
from typing import Any

import anyio.to_thread
import bentoml
import numpy as np
from _bentoml_sdk.method import APIMethod
from bentoml.exceptions import BentoMLException

from pipelines.prediction_log import PredictionLogWriter
from pipelines.schema import FEATURES
from serving.access import REQUEST_STATE, RequestInfo
from serving.contract import (
    DEFAULT_SITE,
    SERVICE_NAME,
    SITE_HEADER,
    SWAGGER_ASSETS,
    VERSION_HEADER,
    ExplainResponse,
    Explanation,
    FeedbackLabel,
    FeedbackRequest,
    FeedbackResponse,
    MetadataRequest,
    ModelMetadata,
    PredictRequest,
    PredictResponse,
    Record,
    openapi_document,
)
from serving.control import CONTROL_ENV, ModelWatcher, requested_model
from serving.middleware import HttpContractMiddleware
from serving.scoring import ServingModel, model_from_store, model_from_stored

logger = logging.getLogger("medops.serving")

MODEL_VERSION_ENV = "MEDOPS_SERVING_MODEL_VERSION"


class RequestTooLarge(BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class NoModelCard(BentoMLException):
    error_code = HTTPStatus.NOT_FOUND


class LogUnavailable(BentoMLException):
    """The prediction could not be logged, so it is not served."""

    error_code = HTTPStatus.SERVICE_UNAVAILABLE


class _ClientErrorsAreNotServerErrors(logging.Filter):
    """BentoML logs a traceback for every request it refuses; a client's bad input is not our error."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return True
        if isinstance(error, BentoMLException):
            return int(error.error_code) >= 500
        return type(error).__name__ != "ValidationError"


logging.getLogger("bentoml._internal.server.http_app").addFilter(_ClientErrorsAreNotServerErrors())


def _deployed_model() -> tuple[str, str]:
    """(model name, registry version) this service serves: Bento arguments, else the environment."""
    from medops.core.settings import get_settings

    arguments = bentoml.use_arguments()
    name = getattr(arguments, "model_name", None) or get_settings().model_name
    version = getattr(arguments, "model_version", None) or os.environ.get(MODEL_VERSION_ENV)
    if not version:
        raise RuntimeError(
            "no model version: build the Bento with --arg model_version=N "
            f"or set {MODEL_VERSION_ENV} (serving.rollout does this)"
        )
    return str(name), str(version)


MODEL_NAME, MODEL_VERSION = _deployed_model()


class ServingState:
    """The model a worker serves right now; replaced as a whole, read once per request."""

    model: ServingModel | None = None

    def version(self) -> str:
        model = self.model
        return model.version if model is not None else MODEL_VERSION

    def swap(self, model: ServingModel) -> None:
        """Serve ``model`` from the next request on; the model it replaces is freed."""
        self.model = model
        _freeze_heap()


STATE = ServingState()


def _freeze_heap() -> None:
    """Exclude everything alive now (libraries, the model) from garbage collection.

    A full collection walks every object scikit-learn, pandas and BentoML created at import: tens of
    milliseconds on whichever request triggered it (the p99). Unfrozen and collected first, because
    frozen objects are never collected: a swapped-out model in a reference cycle (its shap explainer
    calls back into it) would stay in memory for good (tests/test_model_swap.py). The price, one full
    collection holding the GIL, is paid once per swap instead of per request.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


_feature_values = attrgetter(*FEATURES)


def _request_info(ctx: bentoml.Context, records: int) -> RequestInfo:
    """The middleware's record of this request (request id, access log), with its record count."""
    info = (ctx.request.scope.get("state") or {}).get(REQUEST_STATE)
    if info is None:  # called without HttpContractMiddleware in front (never the case when served)
        info = RequestInfo(os.urandom(16).hex())
    info.records = records
    return info


def _not_answered(positions: list[int], site: str | None) -> Exception:
    """A validation error (422 through the middleware) naming each refused ``labels[i].encounter_id``."""
    from pydantic_core import PydanticCustomError, ValidationError

    reason = "no prediction was served for this encounter" + (f" to site {site}" if site else "")
    kind = PydanticCustomError("encounter_not_answered", reason)
    errors = [{"type": kind, "loc": ("labels", i, "encounter_id"), "input": ""} for i in positions]
    return ValidationError.from_exception_data("FeedbackRequest", errors)


@bentoml.service(
    name=SERVICE_NAME,
    workers=1,  # rollout sets the number from settings.serving_workers at start
    traffic={"timeout": 60},
    logging={"access": {"enabled": False}},  # the prediction log is the record of what was served
    # No tracing exporter is configured by default, so a span per request would be pure cost
    # (about a third of a 1-record /predict); a BentoML config with `tracing` overrides this.
    tracing={"excluded_urls": ["/predict", "/explain", "/feedback", "/metadata", "/readyz", "/livez", "/healthz"]},
)
class MedopsService:
    """Breast cancer diagnosis support: probability of malignancy, label at the validated threshold."""

    bento_model = bentoml.models.BentoModel(f"{MODEL_NAME}:{MODEL_VERSION}")

    def __init__(self) -> None:
        from medops.core.settings import get_settings

        settings = get_settings()
        self.max_records = settings.max_records
        self.log = PredictionLogWriter(settings)
        self.durable = settings.prediction_log_durable
        control = os.environ.get(CONTROL_ENV)
        self.control_dir = Path(control) if control else None
        STATE.model = self._initial_model()
        self._cache_api_wrappers()
        self.watcher: ModelWatcher | None = None
        if self.control_dir is not None:
            self.watcher = ModelWatcher(self.control_dir, STATE.version, self._switch)
            self.watcher.start()
        _freeze_heap()
        logger.info(
            "serving %s:%s (%s scoring)", MODEL_NAME, STATE.version(), "numpy" if STATE.model.is_fast else "sklearn"
        )

    def _cache_api_wrappers(self) -> None:
        """Build BentoML's per-call wrapper of each API once: BentoML 1.4 looks the API up on the instance
        per request, and its (non-data) descriptor rebuilds the wrapper with ``inspect.signature`` each time
        (a tenth of a 1-record /predict); a wrapper stored on the instance is found first."""
        for name, method in type(self).__dict__.items():
            if isinstance(method, APIMethod):
                setattr(self, name, method.__get__(self, type(self)))

    def _initial_model(self) -> ServingModel:
        wanted = requested_model(self.control_dir) if self.control_dir is not None else None
        if wanted and wanted != MODEL_VERSION:
            try:
                return model_from_store(MODEL_NAME, wanted)
            except Exception:  # serve the Bento's own version rather than nothing
                logger.exception("cannot load requested model version %s", wanted)
        return model_from_stored(self.bento_model)

    def _switch(self, version: str) -> None:
        STATE.swap(model_from_store(MODEL_NAME, version))

    def __is_ready__(self) -> bool:
        """Not ready once the prediction log failed: a load balancer must stop sending traffic here."""
        return self.log.healthy

    @bentoml.on_shutdown
    def _close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.log.close()

    # helpers ---------------------------------------------------------------------------------
    def _features(self, records: list[Any]) -> np.ndarray:
        if len(records) > self.max_records:
            raise RequestTooLarge(f"{len(records)} records, at most {self.max_records} per request")
        return np.array([_feature_values(record) for record in records], dtype=float)

    # APIs ---------------------------------------------------------------------------------
    @bentoml.api(input_spec=PredictRequest)
    async def predict(self, records: list[Record], ctx: bentoml.Context) -> PredictResponse:  # type: ignore[valid-type]
        """Probability of malignancy and label for each record; every prediction is logged."""
        model = STATE.model
        assert model is not None
        info = _request_info(ctx, len(records))
        X = self._features(records)
        # HttpContractMiddleware (serving.middleware) already refused an X-Site-Id that is not a valid
        # site id or one the key may not claim, and set a site-bound key's own site as X-Site-Id
        default_site = ctx.request.headers.get(SITE_HEADER) or DEFAULT_SITE
        sites = [record.site_id or default_site for record in records]
        if model.is_fast:
            probabilities = model.probability_malignant(X)
            labels = model.labels(X, probabilities)
        else:  # scikit-learn path: keep the event loop free
            probabilities = await anyio.to_thread.run_sync(model.probability_malignant, X)
            labels = await anyio.to_thread.run_sync(model.labels, X, probabilities)
        encounters = [record.encounter_id for record in records]
        try:
            ticket = self.log.log_predictions(
                request_id=info.request_id,  # the X-Request-Id of the answer and the access log's
                model_name=model.name,
                model_version=model.version,
                site_ids=sites,
                encounter_ids=encounters,
                features=X,
                probabilities=probabilities,
                labels=labels,
            )
            # The answer leaves only once its rows are on disk (the group commit covers them).
            if self.durable:
                await self.log.wait_durable(ticket)
        except OSError as exc:
            logger.error("prediction log unavailable, request refused: %s", exc)
            raise LogUnavailable("prediction log unavailable; nothing was served") from exc
        ctx.response.metadata[VERSION_HEADER] = model.version
        # validated by pydantic's compiled core from plain dicts: three times faster than
        # constructing the models one by one in Python
        return PredictResponse.model_validate(
            {
                "model_name": model.name,
                "model_version": model.version,
                "predictions": [
                    {"label": label, "probability_malignant": probability, "encounter_id": encounter}
                    for label, probability, encounter in zip(labels, probabilities.tolist(), encounters, strict=True)
                ],
            }
        )

    @bentoml.api(input_spec=PredictRequest)
    def explain(self, records: list[Record], ctx: bentoml.Context) -> ExplainResponse:  # type: ignore[valid-type]
        """Each feature's contribution to each record's score (exact for linear models, else shap)."""
        model = STATE.model
        assert model is not None
        _request_info(ctx, len(records))
        X = self._features(records)
        result = model.explain(X)
        probabilities = model.probability_malignant(X)
        labels = model.labels(X, probabilities)
        ctx.response.metadata[VERSION_HEADER] = model.version
        return ExplainResponse(
            model_name=model.name,
            model_version=model.version,
            method=result.method,
            explanations=[
                Explanation(
                    encounter_id=record.encounter_id,
                    label=labels[i],
                    probability_malignant=float(probabilities[i]),
                    score=float(result.scores[i]),
                    base_value=float(result.base_values[i]),
                    score_kind=result.score_kind,  # type: ignore[arg-type]
                    contributions=dict(zip(FEATURES, result.contributions[i].tolist(), strict=True)),
                )
                for i, record in enumerate(records)
            ],
        )

    @bentoml.api(input_spec=FeedbackRequest)
    def feedback(self, labels: list[FeedbackLabel], ctx: bentoml.Context) -> FeedbackResponse:
        """Record ground-truth diagnoses for encounters answered for the same site (stored hashed).

        Labels become training data, so a site may label only its own patients: a label for an encounter
        not answered for the request's site is refused (422 naming ``labels[i].encounter_id``), the same
        whether another site's or never answered, so a refusal tells nothing about other sites' encounters.
        A key bound to no site, sending no ``X-Site-Id``, speaks for every site but the smoke-test one.
        """
        _request_info(ctx, len(labels))
        if len(labels) > self.max_records:
            raise RequestTooLarge(f"{len(labels)} labels, at most {self.max_records} per request")
        site = ctx.request.headers.get(SITE_HEADER)  # HttpContractMiddleware sets a bound key's own
        missing = self.log.unanswered(site, [self.log.hash_encounter(label.encounter_id) for label in labels])
        if missing:
            raise _not_answered(missing, site)
        try:
            recorded = self.log.log_feedback((label.encounter_id, label.diagnosis) for label in labels)
        except OSError as exc:
            logger.error("feedback store unavailable, request refused: %s", exc)
            raise LogUnavailable("feedback store unavailable; nothing was recorded") from exc
        ctx.response.metadata[VERSION_HEADER] = STATE.version()
        return FeedbackResponse(recorded=recorded)

    @bentoml.api(input_spec=MetadataRequest)
    def metadata(self, ctx: bentoml.Context) -> ModelMetadata:
        """The served model: name, version, data version, training time, evaluation metrics."""
        model = STATE.model
        assert model is not None
        info = model.metadata
        threshold = info.get("threshold", model.threshold)
        ctx.response.metadata[VERSION_HEADER] = model.version
        return ModelMetadata(
            model_name=model.name,
            model_version=model.version,
            data_version=info.get("data_version"),
            threshold=float(threshold) if threshold not in (None, "") else None,
            trained_at=info.get("trained_at"),
            run_id=info.get("run_id"),
            metrics={str(key): float(value) for key, value in (info.get("metrics") or {}).items()},
            bento=os.environ.get("MEDOPS_SERVING_BENTO"),
            explain_method=model.explain_method,
        )

    @bentoml.api(route="/model-card", input_spec=MetadataRequest)
    def model_card(self, ctx: bentoml.Context) -> str:
        """The served version's model card as its training run logged it (carried in the Bento's model
        metadata, so no MLflow): Markdown, or HTML when the request accepts ``text/html``."""
        model = STATE.model
        assert model is not None
        wants_html = "text/html" in (ctx.request.headers.get("accept") or "").lower()
        text = model.metadata.get("model_card_html" if wants_html else "model_card")
        ctx.response.metadata[VERSION_HEADER] = model.version
        if not text:
            raise NoModelCard(f"model version {model.version} was built without a model card")
        # applied to the response after the API returns, replacing the text/plain of a str result
        ctx.response.metadata["content-type"] = f"text/{'html' if wants_html else 'markdown'}; charset=utf-8"
        return str(text)


def _docs_app() -> Any:
    """``/docs`` (Swagger UI) and ``/docs.json`` (the OpenAPI document), open to browsers; mounted at the
    root ahead of BentoML's own ``/docs.json``, which credits BentoML and lists responses never given."""
    from bentoml._internal import server as bentoml_server
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.routing import Route

    assets = Path(bentoml_server.__file__).parent / "static_content"

    def document(_: Any) -> JSONResponse:
        return JSONResponse(openapi_document(MedopsService.openapi_spec.asdict(), STATE.version()))

    def asset(name: str) -> Route:
        return Route(f"/docs/{name}", lambda _: FileResponse(assets / name))

    routes = [Route("/docs", lambda _: HTMLResponse(_DOCS_PAGE)), Route("/docs.json", document)]
    return Starlette(routes=[*routes, *map(asset, SWAGGER_ASSETS)])


_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medops diagnosis service: API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/swagger-ui-standalone-preset.js"></script>
<script>
window.ui = SwaggerUIBundle({url: "/docs.json", dom_id: "#swagger-ui", persistAuthorization: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset], layout: "BaseLayout"});
</script></body></html>
"""

MedopsService.mount_asgi_app(_docs_app(), path="/", name="medops-docs")
MedopsService.add_asgi_middleware(HttpContractMiddleware, model_version=STATE.version)
