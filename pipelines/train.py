"""Train, evaluate, register and gate a diagnosis model on one data version.

A stratified hold-out (fixed seed) is kept aside; on the training rows a small cross-validated
search compares logistic regression, an SVM and gradient boosting, each a scikit-learn Pipeline
with scaling inside (fitted on training rows only). The operating threshold is chosen on
out-of-fold probabilities to meet the sensitivity target and is stored inside the model
(``FixedThresholdClassifier``), so every place that predicts uses it. The result is one MLflow
run and one registered version with ``@challenger``; ``@champion`` moves only through the gate.

Three steps, each callable (and testable) alone, with paths and small results between them:

- :func:`fit_candidate`: split, search, threshold, fit, evaluate, compare with the champion on the
  same rows; writes the model, the figures and the reference (rows, scores, importance) to a work
  directory and returns a JSON-able :class:`FitResult`;
- :func:`log_run`: one MLflow run with tags, params, metrics, inputs, figures, the model and the
  reference files; returns the run id;
- :func:`register_version`: the registry version of that run, ``@challenger``, the gate's decision
  as tags and the model card; returns the :class:`TrainResult`.

:func:`train_model` composes them (the command line); the ``train_model`` DAG runs them as tasks.
"""

from __future__ import annotations

import json
import shutil
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medops.core.settings import Settings
from pipelines import data_registry, model_registry, model_trust
from pipelines.figures import evaluation_figures
from pipelines.metrics import evaluate_model, probability_malignant
from pipelines.schema import DATA_COLUMNS, FEATURES, LABEL, POSITIVE

FAMILIES = ("logistic_regression", "svm", "gradient_boosting")


@dataclass(frozen=True)
class GateConfig:
    """Promotion thresholds; defaults come from settings, a trigger form may override them."""

    min_sensitivity: float
    min_roc_auc: float
    max_auc_drop: float

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: float | None) -> GateConfig:
        values = {
            "min_sensitivity": settings.min_sensitivity,
            "min_roc_auc": settings.min_roc_auc,
            "max_auc_drop": settings.max_auc_drop,
        }
        values.update({k: float(v) for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str]
    champion_version: str | None
    champion_roc_auc: float | None


@dataclass
class TrainResult:
    """What one training produced: the run, the version, its metrics and the gate's decision."""

    run_id: str
    model_version: str
    family: str
    threshold: float
    data_version: str
    metrics: dict[str, float]
    gate: GateDecision
    promoted: bool = False
    cv_roc_auc: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidate_estimators(seed: int) -> dict[str, tuple[Any, dict[str, list]]]:
    """Each family as a Pipeline with scaling inside, and its small hyper-parameter grid."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return {
        "logistic_regression": (
            Pipeline([("scale", StandardScaler()), ("model", LogisticRegression(max_iter=5000))]),
            {"model__C": [0.1, 1.0, 10.0]},
        ),
        "svm": (
            Pipeline(
                [("scale", StandardScaler()), ("model", CalibratedClassifierCV(SVC(random_state=seed), ensemble=False))]
            ),
            {"model__estimator__C": [1.0, 10.0]},
        ),
        "gradient_boosting": (
            Pipeline([("scale", StandardScaler()), ("model", HistGradientBoostingClassifier(random_state=seed))]),
            {"model__learning_rate": [0.05, 0.1], "model__max_depth": [3, None]},
        ),
    }


def split_rows(frame: pd.DataFrame, settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified hold-out with a fixed seed: (training rows, evaluation rows)."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        frame, test_size=settings.test_size, stratify=frame[LABEL], random_state=settings.seed
    )
    return train.reset_index(drop=True), test.reset_index(drop=True)


def search_best(train: pd.DataFrame, families: list[str], settings: Settings) -> tuple[str, Any, dict[str, float]]:
    """Cross-validated ROC AUC search over the families; returns (family, best pipeline, CV scores)."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    cv = StratifiedKFold(n_splits=settings.cv_folds, shuffle=True, random_state=settings.seed)
    y = (train[LABEL] == POSITIVE).astype(int)  # roc_auc scorer: malignant = 1 here
    scores: dict[str, float] = {}
    best: dict[str, Any] = {}
    for name, (estimator, grid) in candidate_estimators(settings.seed).items():
        if name not in families:
            continue
        search = GridSearchCV(estimator, grid, scoring="roc_auc", cv=cv, n_jobs=settings.train_jobs, refit=False)
        search.fit(train[list(FEATURES)], y)
        scores[name] = float(search.best_score_)
        best[name] = estimator.set_params(**search.best_params_)
    if not scores:
        raise ValueError(f"no known model family in {families}; choose from {', '.join(FAMILIES)}")
    # The simplest family wins ties (FAMILIES is ordered simplest first).
    family = max(scores, key=lambda name: (round(scores[name], 4), -FAMILIES.index(name)))
    return family, best[family], scores


def choose_threshold(estimator: Any, train: pd.DataFrame, target_sensitivity: float, settings: Settings) -> float:
    """The highest threshold on P(malignant) whose out-of-fold sensitivity meets the target."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    cv = StratifiedKFold(n_splits=settings.cv_folds, shuffle=True, random_state=settings.seed)
    probabilities = cross_val_predict(
        clone(estimator), train[list(FEATURES)], train[LABEL], cv=cv, method="predict_proba"
    )
    classes = sorted(train[LABEL].unique())
    positive = probabilities[:, classes.index(POSITIVE)][train[LABEL].to_numpy() == POSITIVE]
    ordered = np.sort(positive)
    allowed_misses = int(np.floor((1.0 - target_sensitivity) * len(ordered) + 1e-9))
    return float(min(max(ordered[allowed_misses], 1e-6), 0.5))


def fit_final(estimator: Any, threshold: float, train: pd.DataFrame):
    from sklearn.model_selection import FixedThresholdClassifier

    model = FixedThresholdClassifier(
        estimator, threshold=threshold, pos_label=POSITIVE, response_method="predict_proba"
    )
    return model.fit(train[list(FEATURES)], train[LABEL])


def gate(
    candidate: dict[str, float], champion_auc: float | None, champion: str | None, config: GateConfig
) -> GateDecision:
    """Promote only a model that is clinically safe and not worse than the champion.

    An undefined metric (``None``: no malignant hold-out row, say) fails the gate: safety that
    cannot be measured is not shown.
    """
    undefined = [name for name in ("sensitivity", "roc_auc") if candidate.get(name) is None]
    if undefined:
        reasons = [f"{name} undefined on the hold-out rows" for name in undefined]
        return GateDecision(False, reasons, champion, champion_auc)
    reasons, passed = [], True
    if candidate["sensitivity"] >= config.min_sensitivity:
        reasons.append(f"sensitivity {candidate['sensitivity']:.3f} >= {config.min_sensitivity:.3f}")
    else:
        passed = False
        reasons.append(f"sensitivity {candidate['sensitivity']:.3f} below {config.min_sensitivity:.3f}")
    if candidate["roc_auc"] >= config.min_roc_auc:
        reasons.append(f"ROC AUC {candidate['roc_auc']:.4f} >= {config.min_roc_auc:.4f}")
    else:
        passed = False
        reasons.append(f"ROC AUC {candidate['roc_auc']:.4f} below {config.min_roc_auc:.4f}")
    if champion_auc is None:
        reasons.append("no champion to compare with")
    elif candidate["roc_auc"] >= champion_auc - config.max_auc_drop:
        reasons.append(f"ROC AUC within {config.max_auc_drop} of champion v{champion} ({champion_auc:.4f})")
    else:
        passed = False
        reasons.append(
            f"ROC AUC {candidate['roc_auc']:.4f} worse than champion v{champion} ({champion_auc:.4f}) "
            f"by more than {config.max_auc_drop}"
        )
    return GateDecision(passed, reasons, champion, champion_auc)


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit_candidate` produced: where its artifacts are and what they measured.

    Plain values only, so a DAG task can pass it on through XCom (``to_dict``/``from_dict``).
    The work directory holds ``model.skops``, ``figures/*.png`` and ``reference/`` (the files
    :func:`pipelines.model_registry.write_reference` writes).
    """

    work_dir: str
    data: dict[str, Any]  # the data version's tag, DVC hash, rows and registry commit
    family: str
    threshold: float
    params: dict[str, Any]  # the chosen family's hyper-parameters
    cv_roc_auc: dict[str, float]
    metrics: dict[str, float | int | None]
    train_rows: int
    holdout_rows: int
    split: dict[str, Any]  # seed, test_size, cv_folds and sensitivity_target the fit used
    champion_version: str | None = None
    champion_roc_auc: float | None = None

    @property
    def data_version(self) -> str:
        return str(self.data["tag"])

    @property
    def model_path(self) -> Path:
        return Path(self.work_dir) / "model.skops"

    @property
    def figures_dir(self) -> Path:
        return Path(self.work_dir) / "figures"

    @property
    def reference_dir(self) -> Path:
        return Path(self.work_dir) / model_registry.REFERENCE

    def load_model(self) -> Any:
        """The fitted model as written by the fit (skops, trusting only medops' list of types)."""
        import skops.io

        return skops.io.load(self.model_path, trusted=list(model_trust.TRUSTED_TYPES))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitResult:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})  # older XComs held more


def training_work_dir(settings: Settings, key: str | None = None) -> Path:
    """Where a training's steps keep their files between each other (under ``MEDOPS_HOME``, shared by workers)."""
    key = key or f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    safe = "".join(char if char.isalnum() or char in "-_." else "_" for char in key)
    return settings.home / "training" / safe


def discard_work(fit: FitResult) -> None:
    """Remove a training's work directory once its run and version exist (they hold copies of everything)."""
    shutil.rmtree(fit.work_dir, ignore_errors=True)


def _champion_auc(holdout: pd.DataFrame, settings: Settings) -> tuple[str | None, float | None]:
    from sklearn.metrics import roc_auc_score

    version = model_registry.champion_version(settings)
    if version is None:
        return None, None
    champion = model_registry.load_model(version, settings)
    auc = roc_auc_score(holdout[LABEL] == POSITIVE, probability_malignant(champion, holdout))
    return version, float(auc)


def fit_candidate(
    settings: Settings,
    data_version: str | None = None,
    families: list[str] | None = None,
    *,
    work_dir: Path | None = None,
) -> FitResult:
    """Fit the best candidate on a data version (latest by default) and evaluate it on the hold-out.

    Splits the rows, searches the families, chooses the operating threshold, fits, evaluates, and
    scores the current champion on the same hold-out rows. Writes the model, the evaluation figures
    and the reference (training and hold-out rows with the model's scores, feature importance) to
    ``work_dir`` (a new folder under ``MEDOPS_HOME/training`` by default); touches no MLflow run.
    """
    from threadpoolctl import threadpool_limits

    families = list(families or FAMILIES)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown model family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    data_version = data_version or data_registry.latest_version(settings)
    if data_version is None:
        raise RuntimeError("the data registry has no data version yet: run `medops init` first")
    data = data_registry.describe_version(data_version, settings)
    frame = data_registry.load_version_frame(data_version, settings)
    train, holdout = split_rows(frame, settings)
    work = Path(work_dir) if work_dir is not None else training_work_dir(settings)
    work.mkdir(parents=True, exist_ok=True)

    # One BLAS thread: on small data, OpenBLAS threads spin against each other and every other
    # process on the machine (search: 71 s with 2 threads vs 3-9 s with 1, measured here).
    with threadpool_limits(limits=1):
        family, estimator, cv_scores = search_best(train, families, settings)
        threshold = choose_threshold(estimator, train, settings.sensitivity_target, settings)
        model = fit_final(estimator, threshold, train)
        evaluation = evaluate_model(model, holdout)
        champion, champion_auc = _champion_auc(holdout, settings)
        model_registry.write_reference(model, train, holdout, work / model_registry.REFERENCE, seed=settings.seed)

    import skops.io

    model_trust.check_types(model, f"the {family} model")  # refused now rather than at registration
    skops.io.dump(model, work / "model.skops")
    _write_figures(evaluation, work / "figures")
    params = {
        key: value
        for key, value in estimator.get_params().items()
        if key.startswith("model__") and isinstance(value, int | float | str | bool | None)
    }
    return FitResult(
        work_dir=str(work),
        data=asdict(data),
        family=family,
        threshold=threshold,
        params=params,
        cv_roc_auc=cv_scores,
        metrics=evaluation.metrics,
        train_rows=len(train),
        holdout_rows=len(holdout),
        split={
            "seed": settings.seed,
            "test_size": settings.test_size,
            "cv_folds": settings.cv_folds,
            "sensitivity_target": settings.sensitivity_target,
        },
        champion_version=champion,
        champion_roc_auc=champion_auc,
    )


def _write_figures(evaluation: Any, directory: Path) -> None:
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    for name, figure in evaluation_figures(evaluation).items():
        figure.savefig(directory / name)
        plt.close(figure)


def log_run(
    fit: FitResult,
    settings: Settings,
    *,
    gate_config: GateConfig | None = None,
    trigger: str = "manual",
    airflow_run_id: str | None = None,
) -> str:
    """Log a fit as one MLflow run and return its id.

    Tags (data version and DVC hash, code git sha, Airflow run id, trigger), params (family,
    hyper-parameters, threshold, split, gate), hold-out metrics (undefined ones left out), the
    training and hold-out rows as inputs, the figures, the model (safe skops format) and the
    reference files under ``reference/``. Registering the model is :func:`register_version`'s job.
    """
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    gate_config = gate_config or GateConfig.from_settings(settings)
    model = fit.load_model()
    train, holdout, _, _ = model_registry.read_reference(fit.reference_dir)
    data_version = fit.data_version
    experiment_id = model_registry.ensure_experiment(settings)
    versions_seen = data_registry.list_versions(settings)[: data_registry.version_number(data_version)]
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{fit.family}-{data_version}") as run:
        mlflow.set_tags(
            {
                "data_version": data_version,
                "data_dvc_md5": fit.data["dvc_md5"],
                "data_registry_commit": fit.data["commit"],
                "data_versions_seen": ",".join(versions_seen),
                "code_git_sha": model_registry.code_version(),
                "airflow_run_id": airflow_run_id or "",
                "trigger": trigger,
                "family": fit.family,
            }
        )
        mlflow.log_params(
            {
                "family": fit.family,
                **fit.params,
                "threshold": round(fit.threshold, 6),
                **fit.split,
                "train_rows": fit.train_rows,
                "test_rows": fit.holdout_rows,
                **{f"gate_{k}": v for k, v in asdict(gate_config).items()},
            }
        )
        mlflow.log_metrics({k: float(v) for k, v in fit.metrics.items() if v is not None})
        mlflow.log_metrics({f"cv_roc_auc_{k}": v for k, v in fit.cv_roc_auc.items()})
        if fit.champion_roc_auc is not None:
            mlflow.log_metric("champion_roc_auc_same_rows", fit.champion_roc_auc)
        source = f"{settings.registry_dir}@{data_version}"
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        for rows, name, context in ((train, "train", "training"), (holdout, "holdout", "evaluation")):
            dataset = mlflow.data.from_pandas(
                rows[list(DATA_COLUMNS)], source=source, targets=LABEL, name=f"{data_version}-{name}"
            )
            mlflow.log_input(dataset, context=context)
        mlflow.log_artifacts(str(fit.figures_dir))
        mlflow.log_artifacts(str(fit.reference_dir), artifact_path=model_registry.REFERENCE)
        features = holdout[list(FEATURES)]
        mlflow.sklearn.log_model(
            model,
            name="model",
            # recorded in MLmodel for MLflow's own loader; medops never reads it back (model_trust)
            skops_trusted_types=list(model_trust.TRUSTED_TYPES),
            # Stated, not inferred: inference re-imports the model in a subprocess (~20 s here).
            pip_requirements=mlflow.sklearn.get_default_pip_requirements(include_skops=True),
            signature=infer_signature(features, model.predict(features)),
            input_example=features.head(3),
        )
        return run.info.run_id


def _version_of_run(run_id: str, settings: Settings) -> str | None:
    """The registry version already made from ``run_id`` (a retried register step), if any."""
    found = model_registry.client(settings).search_model_versions(
        f"name = '{settings.model_name}' and run_id = '{run_id}'"
    )
    return str(min(int(version.version) for version in found)) if found else None


def register_version(
    run_id: str,
    fit: FitResult,
    settings: Settings,
    *,
    gate_config: GateConfig | None = None,
    trigger: str = "manual",
    airflow_run_id: str | None = None,
) -> TrainResult:
    """Register the run's model as a version with ``@challenger`` and the gate's decision.

    The gate judges the fit's hold-out metrics against ``gate_config`` and the champion's ROC AUC on
    the same rows; its decision and reasons become version tags, and the model card (which names
    the version and the decision) goes to the run and the version's description. ``@champion``
    is left to :func:`promote`, so that a person can approve in between. Run twice for the same
    run (a retried task), it reuses the version the first call made. A model medops could not load
    safely is refused here (:func:`pipelines.model_registry.register_trusted`).
    """
    gate_config = gate_config or GateConfig.from_settings(settings)
    decision = gate(fit.metrics, fit.champion_roc_auc, fit.champion_version, gate_config)
    mlflow_client = model_registry.client(settings)
    version = _version_of_run(run_id, settings)
    if version is None:
        (output,) = mlflow_client.get_run(run_id).outputs.model_outputs
        version = model_registry.register_trusted(f"models:/{output.model_id}", settings)
    result = TrainResult(
        run_id=run_id,
        model_version=version,
        family=fit.family,
        threshold=fit.threshold,
        data_version=fit.data_version,
        metrics=fit.metrics,
        gate=decision,
        cv_roc_auc=fit.cv_roc_auc,
    )
    card = model_card(result, fit, gate_config, settings)
    mlflow_client.log_text(run_id, card, "model_card.md")
    mlflow_client.update_model_version(settings.model_name, version, description=card)
    mlflow_client.set_registered_model_alias(settings.model_name, model_registry.CHALLENGER, version)
    model_registry.tag_version(
        version,
        {
            "data_version": fit.data_version,
            "data_dvc_md5": fit.data["dvc_md5"],
            "threshold": f"{fit.threshold:.6f}",
            "family": fit.family,
            "roc_auc": _figure(fit.metrics["roc_auc"], 4),
            "sensitivity": _figure(fit.metrics["sensitivity"], 4),
            "gate_passed": str(decision.passed).lower(),
            "gate_reasons": json.dumps(decision.reasons),
            "gate_decision": "passed" if decision.passed else "rejected",
            "trigger": trigger,
            "airflow_run_id": airflow_run_id or "",
        },
        settings,
    )
    return result


def _figure(value: float | int | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def model_card(result: TrainResult, fit: FitResult, config: GateConfig, settings: Settings) -> str:
    m = {name: _figure(value, 4 if name in ("roc_auc", "brier") else 3) for name, value in result.metrics.items()}
    split = fit.split
    return f"""# Model card: {settings.model_name} v{result.model_version}

**Intended use.** Decision support for classifying breast masses (fine-needle aspirate features) as
malignant or benign. Not a diagnosis on its own; a clinician reviews every case.

**Data.** Data version `{fit.data_version}` of the medops data registry (DVC hash `{fit.data["dvc_md5"]}`, \
{fit.data["rows"]} rows). Stratified hold-out of {split["test_size"]:.0%} (seed {split["seed"]}) for evaluation; \
the exact training and hold-out rows are stored with the run under `{model_registry.REFERENCE}/`.

**Model.** {result.family}, chosen by {split["cv_folds"]}-fold cross-validated ROC AUC
({", ".join(f"{k} {v:.4f}" for k, v in result.cv_roc_auc.items())}).

**Operating point.** P(malignant) >= {result.threshold:.4f}, chosen on out-of-fold probabilities for
sensitivity >= {split["sensitivity_target"]}. Missing a malignant case is the costly error.

**Hold-out metrics (malignant positive).** ROC AUC {m["roc_auc"]}, sensitivity {m["sensitivity"]},
specificity {m["specificity"]}, PPV {m["ppv"]}, NPV {m["npv"]}, F1 {m["f1"]},
Brier {m["brier"]} (TP {result.metrics["tp"]}, FN {result.metrics["fn"]}, TN {result.metrics["tn"]}, \
FP {result.metrics["fp"]}).

**Gate.** sensitivity >= {config.min_sensitivity}, ROC AUC >= {config.min_roc_auc}, at most {config.max_auc_drop}
ROC AUC below the champion on the same rows. Decision: {"passed" if result.gate.passed else "failed"}:
{"; ".join(result.gate.reasons)}.

**Limitations.** Trained on few sites; monitor drift per site. Inputs outside plausible ranges are refused.
"""


def train_model(
    settings: Settings,
    *,
    data_version: str | None = None,
    families: list[str] | None = None,
    gate_config: GateConfig | None = None,
    trigger: str = "manual",
    airflow_run_id: str | None = None,
) -> TrainResult:
    """Fit, log and register in one call (the command line): :func:`fit_candidate`, :func:`log_run`,
    :func:`register_version`. The work directory is removed once the version exists."""
    gate_config = gate_config or GateConfig.from_settings(settings)
    fit = fit_candidate(settings, data_version, families)
    steps = {"gate_config": gate_config, "trigger": trigger, "airflow_run_id": airflow_run_id}
    run_id = log_run(fit, settings, **steps)
    result = register_version(run_id, fit, settings, **steps)
    discard_work(fit)
    return result


def promote(result_or_version: TrainResult | str, settings: Settings, *, approved_by: str | None = None) -> bool:
    """Move ``@champion`` to a version whose gate passed; returns whether it moved."""
    version = result_or_version.model_version if isinstance(result_or_version, TrainResult) else result_or_version
    tags = model_registry.version_tags(version, settings)
    if tags.get("gate_passed") != "true":
        model_registry.tag_version(version, {"gate_decision": "rejected"}, settings)
        return False
    previous = model_registry.champion_version(settings)
    model_registry.set_champion(version, settings)
    model_registry.tag_version(
        version,
        {
            "gate_decision": "promoted",
            "previous_champion": previous or "",
            **({"approved_by": approved_by} if approved_by else {}),
        },
        settings,
    )
    return True
