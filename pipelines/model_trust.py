"""Which model artifacts medops loads: skops files of known types whose bytes are the ones registered.

Anyone who can write to the MLflow store (or the BentoML store) must not get code execution in
serving or in the pipeline's tasks by writing a model. So:

- pickle and cloudpickle flavors are refused outright: loading them runs whatever code they hold;
- a skops file is loaded trusting only :data:`TRUSTED_TYPES`, a list in this code, never the list
  the artifact's own ``MLmodel`` file offers (the writer of the artifact writes that file too);
- registration (:func:`pipelines.model_registry.register_trusted`) refuses a model holding any type
  outside the list and records the SHA-256 of its skops file as the version's ``model_sha256`` tag
  (the Bento model's metadata carries it too), and every load compares the file with it first.

Imports only the standard library at the top: the serving Bento carries this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medops.core.files import sha256_file

# The types of our model families (pipelines.train.candidate_estimators) that skops does not
# already trust by itself (it trusts scikit-learn's public estimators and plain numpy/scipy
# containers). A new family that needs another type is refused at registration until it is
# added here, in a reviewed change.
TRUSTED_TYPES: tuple[str, ...] = (
    "sklearn.calibration._CalibratedClassifier",  # CalibratedClassifierCV around the SVC
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",  # HistGradientBoostingClassifier
)
DIGEST_KEY = "model_sha256"  # model version tag and Bento model metadata


class UntrustedModel(RuntimeError):
    """A model artifact medops will not load or register (pickle, unknown types, no recorded digest)."""


class ModelTampered(UntrustedModel):
    """A model artifact whose bytes differ from those recorded when it was registered."""


def model_file(model_dir: Path, what: str) -> Path:
    """The skops file of an MLflow sklearn model directory; refuses any serialization but skops."""
    import yaml

    try:
        spec = yaml.safe_load((Path(model_dir) / "MLmodel").read_text()) or {}
    except OSError as error:
        raise UntrustedModel(f"{what}: no MLmodel file in {model_dir} ({error.strerror})") from None
    flavor = (spec.get("flavors") or {}).get("sklearn")
    if not flavor:
        raise UntrustedModel(f"{what} has no sklearn flavor")
    serialization = flavor.get("serialization_format", "pickle")
    if serialization != "skops":
        raise UntrustedModel(
            f"{what} is stored as {serialization}, which runs arbitrary code when loaded; medops loads only "
            "skops models (register it through medops train, which writes skops)"
        )
    name = str(flavor.get("pickled_model") or "model.skops")
    path = (Path(model_dir) / name).resolve()
    if Path(model_dir).resolve() not in path.parents:  # the MLmodel file names the file: keep it inside
        raise UntrustedModel(f"{what}: its MLmodel file points outside the model directory ({name})")
    return path


def foreign_types(path: Path | None = None, *, data: bytes | None = None) -> list[str]:
    """Types in a skops file (or its bytes) that neither skops nor :data:`TRUSTED_TYPES` trusts."""
    import skops.io

    found = skops.io.get_untrusted_types(file=path) if path is not None else skops.io.get_untrusted_types(data=data)
    return sorted(set(found) - set(TRUSTED_TYPES))


def check_types(model: Any, what: str = "the model") -> None:
    """Refuse a fitted model that would need a type outside the trusted list to load again."""
    import skops.io

    foreign = foreign_types(data=skops.io.dumps(model))
    if foreign:
        raise UntrustedModel(
            f"{what} holds types medops does not trust: {', '.join(foreign)} "
            "(pipelines/model_trust.py TRUSTED_TYPES lists the ones our model families need)"
        )


def registrable_digest(model_dir: Path, what: str) -> str:
    """The SHA-256 of a model directory's skops file after checking it may be registered."""
    path = model_file(model_dir, what)
    foreign = foreign_types(path)
    if foreign:
        raise UntrustedModel(f"{what} holds types medops does not trust: {', '.join(foreign)}; not registered")
    return sha256_file(path)


def verify_digest(data: bytes, expected: str | None, what: str, name: str = "model.skops") -> None:
    """Raise unless ``data``'s SHA-256 is ``expected`` (the digest recorded at registration)."""
    import hashlib

    if not expected:
        raise UntrustedModel(
            f"{what} has no recorded artifact digest ({DIGEST_KEY}): it was not registered through medops, "
            "so its artifact cannot be checked; register it again with medops train"
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ModelTampered(
            f"{what}: the model artifact {name} was changed after registration "
            f"(expected sha256 {expected}, found {actual}); refusing to load it"
        )


def load_trusted(model_dir: Path, expected_digest: str | None, what: str) -> Any:
    """The estimator of an MLflow sklearn model directory: skops only, digest checked, our type list.

    The file is read once and the checked bytes are the ones loaded, so it cannot be swapped
    between the check and the load.
    """
    import skops.io
    from skops.io.exceptions import UntrustedTypesFoundException

    path = model_file(model_dir, what)
    data = path.read_bytes()
    verify_digest(data, expected_digest, what, path.name)
    try:
        return skops.io.loads(data, trusted=list(TRUSTED_TYPES))
    except UntrustedTypesFoundException as error:
        raise UntrustedModel(f"{what} holds types medops does not trust: {error}") from None
