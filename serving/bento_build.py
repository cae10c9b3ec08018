"""Import a registered model version into BentoML and build its Bento (run in a child process).

BentoML resolves its home (``BENTOML_HOME``) once per process, so the rollout runs these steps in
a child whose ``BENTOML_HOME`` is ``settings.bentoml_home``; the Airflow task, the command line
and the tests then all use the same store whatever they touched before.
``python -m serving.bento_build --version N`` prints a JSON line with the tags it produced.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medops.core.settings import REPO_ROOT, Settings, get_settings
from pipelines import model_trust
from pipelines.model_registry import configure_mlflow
from serving.scoring import MLFLOW_MODEL_DIR

logger = logging.getLogger("medops.serving")

BENTOFILE = Path(__file__).with_name("bentofile.yaml")


def bento_name(settings: Settings) -> str:
    return f"{settings.model_name}_service"


def registry_metadata(version: str, settings: Settings) -> dict[str, Any]:
    """What /metadata reports, read once from the MLflow registry (run metrics, tags, times)."""
    from mlflow import MlflowClient

    from pipelines.model_card import stored_card

    client = MlflowClient()
    model_version = client.get_model_version(settings.model_name, str(version))
    tags = dict(model_version.tags or {})
    metadata: dict[str, Any] = {
        "data_version": tags.get("data_version", ""),
        "threshold": tags.get("threshold", ""),
        "run_id": model_version.run_id or "",
        "registered_at": _iso(model_version.creation_timestamp),
        "metrics": {},
        "trained_at": "",
        model_trust.DIGEST_KEY: tags.get(model_trust.DIGEST_KEY, ""),  # checked before every load
    }
    if model_version.run_id:
        run = client.get_run(model_version.run_id)
        metadata["metrics"] = {key: float(value) for key, value in run.data.metrics.items()}
        metadata["trained_at"] = _iso(run.info.end_time or run.info.start_time)
        metadata["git_sha"] = run.data.tags.get("mlflow.source.git.commit", "")
        metadata["airflow_run_id"] = run.data.tags.get("airflow_run_id", "")
        # The model card as the run logged it: GET /model-card answers without reaching MLflow.
        if card := stored_card(str(version), settings):
            metadata["model_card"], metadata["model_card_html"] = card
    return metadata


def _iso(millis: int | None) -> str:
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat() if millis else ""


def import_model(version: str, settings: Settings) -> str:
    """Copy ``models:/<name>/<version>`` from the MLflow registry into the BentoML model store."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = f"{settings.model_name}:{version}"
    with suppress(NotFound):
        bentoml.models.get(tag)
        return tag
    configure_mlflow(settings)
    metadata = registry_metadata(version, settings)
    stored = bentoml.mlflow.import_model(
        tag,
        f"models:/{settings.model_name}/{version}",
        labels={"data_version": metadata["data_version"] or "unknown", "registry_version": str(version)},
        metadata=metadata,
    )
    # The copy the Bento will serve must be the registered bytes, and skops: checked here so that a
    # tampered or pickled model never gets as far as a serving worker (which checks again).
    model_dir = Path(stored.path_of(MLFLOW_MODEL_DIR))
    what = f"model version {version} of {settings.model_name}"
    try:
        path = model_trust.model_file(model_dir, what)
        model_trust.verify_digest(path.read_bytes(), metadata[model_trust.DIGEST_KEY], what, path.name)
    except model_trust.UntrustedModel:
        bentoml.models.delete(tag)
        raise
    return tag


def build_bento(version: str, settings: Settings) -> str:
    """Build the Bento ``<model_name>_service:<version>`` declaring model ``<model_name>:<version>``."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = f"{bento_name(settings)}:{version}"
    with suppress(NotFound):
        bentoml.bentos.get(tag)
        return tag
    bento = bentoml.bentos.build_bentofile(
        str(BENTOFILE),
        name=bento_name(settings),
        version=str(version),
        build_ctx=str(REPO_ROOT),
        labels={"model_name": settings.model_name, "model_version": str(version)},
        args={"model_name": settings.model_name, "model_version": str(version)},
    )
    return str(bento.tag)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--version", required=True)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    settings = get_settings()
    result = {"model": import_model(options.version, settings), "bento": build_bento(options.version, settings)}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
