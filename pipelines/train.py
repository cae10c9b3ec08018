"""Train, evaluate, register and gate a diagnosis model on one data version.

Rows are split into training and hold-out by a hash of each row (:mod:`pipelines.holdout`), so a
row held out once stays held out in every later data version. On the training rows a small
cross-validated search compares logistic regression, an SVM and gradient boosting, each a
scikit-learn Pipeline with scaling inside. The operating threshold is chosen on out-of-fold
probabilities to meet the sensitivity target and is stored inside the model
(``FixedThresholdClassifier``), so every place that predicts uses it. ``@champion`` moves only
through the gate (:mod:`pipelines.gate`). Three steps, each callable alone with paths and small
results between them: :func:`fit_candidate` (files in a work directory, a JSON-able
:class:`FitResult`), :func:`log_run` (one MLflow run) and :func:`register_version` (the registry
version, ``@challenger``, the gate's decision and the model card). :func:`train_model` composes
them (the command line); the ``train_model`` DAG runs them as tasks.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from medops.core import links
from medops.core.settings import Settings
from pipelines import data_registry, governance, model_registry, model_trust
from pipelines.figures import evaluation_figures
from pipelines.metrics import evaluate_model, probability_malignant
from pipelines.schema import DATA_COLUMNS, FEATURES, LABEL, POSITIVE, SITE

if TYPE_CHECKING:
    from pipelines.gate import GateDecision
    from pipelines.protocol import Protocol, Thresholds

log = logging.getLogger(__name__)

FAMILIES = ("logistic_regression", "svm", "gradient_boosting")
DECISION_ARTIFACT = "gate/decision.json"
# Trigger-form and command-line names of the gate thresholds a person may set (the protocol's names).
FORM_THRESHOLDS = ("sensitivity_lower", "roc_auc_lower", "non_inferiority_margin")
SHORT_REASON_CHARS = 500


def plan_gate(
    settings: Settings, *, families: Sequence[str] | None, form: Mapping[str, float | None] | None, trigger: str
) -> dict[str, Any]:
    """The thresholds a person set (blank ones dropped) and why promoting needs a person, if it does.

    ``{"thresholds", "approval_reasons", "needs_approval"}``, plain JSON for the DAG's XCom. A
    wrong threshold fails here, before minutes of training.
    """
    from pipelines.protocol import gate_thresholds, load_protocol

    protocol = load_protocol()
    thresholds = overrides_only(form)
    gate_thresholds(protocol, thresholds)
    reasons = governance.training_approvals(
        settings, protocol, families=known_families(families), thresholds=thresholds, trigger=trigger
    )
    return {"thresholds": thresholds, "approval_reasons": reasons, "needs_approval": bool(reasons)}


def known_families(families: Sequence[str] | None) -> list[str]:
    """The families asked for (all by default); ValueError naming any this code cannot train."""
    chosen = list(families or FAMILIES)
    unknown = sorted(set(chosen) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown model family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    return chosen


def overrides_only(thresholds: Mapping[str, float | None] | None) -> dict[str, float]:
    """The thresholds a person actually set (blank ones dropped), as plain floats."""
    return {name: float(value) for name, value in (thresholds or {}).items() if value is not None}


@dataclass
class TrainResult:
    """What one training produced: the run, the version, its metrics and the gate's decision."""

    run_id: str
    model_version: str
    family: str
    threshold: float
    data_version: str
    metrics: dict[str, float | int | None]
    gate: GateDecision
    approval_reasons: list[str] = field(default_factory=list)
    promoted: bool = False
    cv_roc_auc: dict[str, float] = field(default_factory=dict)
    holdout: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return vars(self) | {"gate": self.gate.to_dict()}


def candidate_estimators(seed: int) -> dict[str, tuple[Any, dict[str, list]]]:
    """Each family as a Pipeline with scaling inside, and its small hyper-parameter grid."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    def scaled(model: Any) -> Pipeline:
        return Pipeline([("scale", StandardScaler()), ("model", model)])

    return {
        "logistic_regression": (scaled(LogisticRegression(max_iter=5000)), {"model__C": [0.1, 1.0, 10.0]}),
        "svm": (
            scaled(CalibratedClassifierCV(SVC(random_state=seed), ensemble=False)),
            {"model__estimator__C": [1.0, 10.0]},
        ),
        "gradient_boosting": (
            scaled(HistGradientBoostingClassifier(random_state=seed)),
            {"model__learning_rate": [0.05, 0.1], "model__max_depth": [3, None]},
        ),
    }


def _grid_search(train: pd.DataFrame, family: str, settings: Settings) -> tuple[float, dict[str, Any]]:
    """One family's cross-validated ROC AUC search: (best score, best parameters)."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    estimator, grid = candidate_estimators(settings.seed)[family]
    cv = StratifiedKFold(n_splits=settings.cv_folds, shuffle=True, random_state=settings.seed)
    y = (train[LABEL] == POSITIVE).astype(int)  # roc_auc scorer: malignant = 1 here
    search = GridSearchCV(estimator, grid, scoring="roc_auc", cv=cv, n_jobs=settings.train_jobs, refit=False)
    search.fit(train[list(FEATURES)], y)
    return float(search.best_score_), dict(search.best_params_)


def _best_family(scores: dict[str, float]) -> str:
    # The simplest family wins ties (FAMILIES is ordered simplest first).
    return max(scores, key=lambda name: (round(scores[name], 4), -FAMILIES.index(name)))


def search_best(train: pd.DataFrame, families: list[str], settings: Settings) -> tuple[str, Any, dict[str, float]]:
    """Cross-validated ROC AUC search over the families; returns (family, best pipeline, CV scores)."""
    searched = {name: _grid_search(train, name, settings) for name in FAMILIES if name in families}
    scores = {name: score for name, (score, _) in searched.items()}
    family = _best_family(scores)
    return family, candidate_estimators(settings.seed)[family][0].set_params(**searched[family][1]), scores


def training_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, hold-out rows) of a data version: the row-hash split at the protocol's share."""
    from pipelines.holdout import split_by_row_key
    from pipelines.protocol import load_protocol

    return split_by_row_key(frame, load_protocol().automatic.holdout_share)


def search_family(settings: Settings, data_version: str, family: str) -> dict[str, Any]:
    """One family's search on a data version's training rows, for one mapped task of the fan-out.

    Returns only names and numbers (family, data version, CV ROC AUC, best parameters): a worker on
    another host restores the rows from the DVC remote itself, and nothing but this dict travels.
    """
    from threadpoolctl import threadpool_limits

    known_families([family])
    train, _ = training_rows(data_registry.load_version_frame(data_version, settings))
    with threadpool_limits(limits=1):
        score, params = _grid_search(train, family, settings)
    return {"family": family, "data_version": data_version, "cv_roc_auc": score, "params": params}


def choose_best(searches: list[dict[str, Any]]) -> dict[str, Any]:
    """The reduce step: the family with the best CV ROC AUC (the simplest on a tie), with every score."""
    if not searches:
        raise ValueError("no family was searched")
    versions = {search["data_version"] for search in searches}
    if len(versions) != 1:
        raise ValueError(f"searches on different data versions: {', '.join(sorted(versions))}")
    scores = {search["family"]: float(search["cv_roc_auc"]) for search in searches}
    best = next(search for search in searches if search["family"] == _best_family(scores))
    return best | {"cv_scores": scores}


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


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit_candidate` produced: where its artifacts are and what they measured.

    Plain values only, so a DAG task can pass it on through XCom (``to_dict``/``from_dict``). The
    work directory holds ``model.skops``, ``figures/*.png`` and ``reference/`` (the files
    :func:`pipelines.model_registry.write_reference` writes); ``holdout`` is the hold-out's
    :class:`pipelines.holdout.HoldoutSummary`.
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
    split: dict[str, Any]  # hold-out rule and share, seed, cv_folds and sensitivity_target the fit used
    holdout: dict[str, Any] = field(default_factory=dict)
    families: list[str] = field(default_factory=list)  # every family the search compared

    @property
    def data_version(self) -> str:
        return str(self.data["tag"])

    @property
    def reference_dir(self) -> Path:
        return Path(self.work_dir) / model_registry.REFERENCE

    def load_model(self) -> Any:
        """The fitted model as written by the fit (skops, trusting only medops' list of types)."""
        with model_registry.quiet_model_io():
            import skops.io

            return skops.io.load(Path(self.work_dir) / "model.skops", trusted=list(model_trust.TRUSTED_TYPES))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitResult:
        # older XComs held more
        return cls(**{key: value for key, value in data.items() if key in cls.__dataclass_fields__})


def training_work_dir(settings: Settings, key: str | None = None) -> Path:
    """Where a training's steps keep their files between each other (under ``MEDOPS_HOME``, shared by workers)."""
    key = key or f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    safe = "".join(char if char.isalnum() or char in "-_." else "_" for char in key)
    return settings.home / "training" / safe


def fit_candidate(
    settings: Settings,
    data_version: str | None = None,
    families: list[str] | None = None,
    *,
    work_dir: Path | None = None,
    chosen: dict[str, Any] | None = None,
) -> FitResult:
    """Fit the best candidate on a data version (latest by default) and evaluate it on the hold-out.

    Splits the rows by their hash, searches the families (unless ``chosen``, from
    :func:`choose_best`, says the fanned-out search already ran), chooses the operating threshold,
    fits and evaluates. Writes the model, the evaluation figures and the reference (rows with the
    model's scores, feature importance) to ``work_dir`` (a new folder under
    ``MEDOPS_HOME/training`` by default); touches no MLflow run.
    """
    from threadpoolctl import threadpool_limits

    from pipelines.holdout import describe_holdout
    from pipelines.protocol import load_protocol

    families = known_families(families)
    data_version = data_version or data_registry.latest_version(settings)
    if data_version is None:
        raise RuntimeError("the data registry has no data version yet: run `medops init` first")
    if chosen is not None and chosen["data_version"] != data_version:
        raise ValueError(f"the search ran on {chosen['data_version']}, not on {data_version}")
    data = data_registry.describe_version(data_version, settings)
    train, holdout = training_rows(data_registry.load_version_frame(data_version, settings))
    if holdout.empty or train.empty:
        raise ValueError(f"{data_version}: the hash split left {len(train)} training and {len(holdout)} hold-out rows")
    work = Path(work_dir) if work_dir is not None else training_work_dir(settings)
    work.mkdir(parents=True, exist_ok=True)

    # One BLAS thread: on small data, OpenBLAS threads spin against each other and every other
    # process on the machine (search: 71 s with 2 threads vs 3-9 s with 1, measured here).
    with threadpool_limits(limits=1):
        if chosen is not None:
            family, cv_scores = chosen["family"], dict(chosen["cv_scores"])
            estimator = candidate_estimators(settings.seed)[family][0].set_params(**chosen["params"])
        else:
            family, estimator, cv_scores = search_best(train, families, settings)
        threshold = choose_threshold(estimator, train, settings.sensitivity_target, settings)
        model = fit_final(estimator, threshold, train)
        evaluation = evaluate_model(model, holdout)
        model_registry.write_reference(model, train, holdout, work / model_registry.REFERENCE, seed=settings.seed)

    with model_registry.quiet_model_io():
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
            "holdout_rule": "sha256-row-key",
            "holdout_share": load_protocol().automatic.holdout_share,
            "seed": settings.seed,
            "cv_folds": settings.cv_folds,
            "sensitivity_target": settings.sensitivity_target,
        },
        holdout=describe_holdout(holdout).to_dict(),
        families=families,
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
    thresholds: Mapping[str, float | None] | None = None,
    trigger: str = "manual",
    airflow_run_id: str | None = None,
    actor: str = governance.SCHEDULER,
    audit: bool = True,
) -> str:
    """Log a fit as one MLflow run (tags, params, hold-out metrics, the rows as inputs, figures, the
    skops model and ``reference/``), record it in the audit trail, and return the run id.

    ``audit=False`` leaves the audit entry to :func:`record_training_run`: the DAG logs on a train
    worker, whose host keeps no audit trail, and records on the scheduler's side.
    """
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    from pipelines.protocol import gate_thresholds, load_protocol

    protocol = load_protocol()
    limits = gate_thresholds(protocol, thresholds)
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
                "airflow_run_url": links.airflow_run(settings, "train_model", airflow_run_id) if airflow_run_id else "",
                "trigger": trigger,
                "family": fit.family,
                "actor": actor,
                **_holdout_tags(fit.holdout),
                "protocol_version": str(protocol.version),
                "protocol_sha256": protocol.sha256,
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
                **{f"gate_{name}": value for name, value in limits.model_dump().items()},
            }
        )
        mlflow.log_metrics({k: float(v) for k, v in fit.metrics.items() if v is not None})
        mlflow.log_metrics({f"cv_roc_auc_{k}": v for k, v in fit.cv_roc_auc.items()})
        source: Any = f"{settings.registry_dir}@{data_version}"
        if settings.registry_url:  # a worker host read the registry's remote; MLflow knows no git source type
            from mlflow.data.http_dataset_source import HTTPDatasetSource

            source = HTTPDatasetSource(f"{settings.registry_url}@{data_version}")
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        for rows, name, context in ((train, "train", "training"), (holdout, "holdout", "evaluation")):
            dataset = mlflow.data.from_pandas(
                rows[list(DATA_COLUMNS)], source=source, targets=LABEL, name=f"{data_version}-{name}"
            )
            mlflow.log_input(dataset, context=context)
        mlflow.log_artifacts(str(Path(fit.work_dir) / "figures"))
        mlflow.log_artifacts(str(fit.reference_dir), artifact_path=model_registry.REFERENCE)
        features = holdout[list(FEATURES)]
        with model_registry.quiet_model_io():
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
        run_id = run.info.run_id
        log.info("MLflow run: %s", links.mlflow_run(settings, experiment_id, run_id))
    if audit:
        record_training_run(
            fit, run_id, settings, thresholds=thresholds, trigger=trigger, airflow_run_id=airflow_run_id, actor=actor
        )
    return run_id


def record_training_run(
    fit: FitResult,
    run_id: str,
    settings: Settings,
    *,
    thresholds: Mapping[str, float | None] | None = None,
    trigger: str = "manual",
    airflow_run_id: str | None = None,
    actor: str = governance.SCHEDULER,
) -> None:
    """The audit entry of a logged training run, once (a retried task finds it), from what the fit
    returned and the run's tags in MLflow: no file of the host that fitted is needed."""
    from medops.core import audit

    if any(entry.action == "training_run" and entry.links.get("run_id") == run_id for entry in audit.entries(settings)):
        return
    tags = model_registry.client(settings).get_run(run_id).data.tags
    versions_seen = [tag for tag in tags.get("data_versions_seen", "").split(",") if tag]
    governance.record(
        "training_run",
        actor=actor,
        reason=f"{trigger} training: {fit.family} on {fit.data_version}",
        settings=settings,
        links={"data_version": fit.data_version, "data_dvc_md5": fit.data["dvc_md5"], "airflow_run_id": airflow_run_id},
        details={
            "family": fit.family,
            "families_compared": fit.families or list(fit.cv_roc_auc),
            "threshold": round(fit.threshold, 6),
            "train_rows": fit.train_rows,
            "holdout": {key: fit.holdout.get(key) for key in ("rows", "malignant", "benign", "sha256")},
            "gate_thresholds_set": overrides_only(thresholds),
            "data_versions_seen": versions_seen,
            "code_git_sha": tags.get("code_git_sha", model_registry.code_version()),
        },
        run_id=run_id,
    )


def _holdout_tags(holdout: Mapping[str, Any]) -> dict[str, str]:
    """The hold-out's size, malignant count and fingerprint, as tags for the run and the version."""
    return {f"holdout_{key}": str(holdout.get(key, "")) for key in ("rows", "malignant", "sha256")}


def judge_version(
    version: str, settings: Settings, protocol: Protocol, thresholds: Thresholds | None = None
) -> GateDecision:
    """The gate's decision for a registered version, on the hold-out rows its run STORED.

    The candidate and the champion (whatever ``@champion`` points at now, unless it is this
    version) are loaded from the registry and both scored on exactly those rows, with the site of
    each row. If a champion from before the hash hold-out trained on some of them, the decision
    says how many.
    """
    from pipelines.gate import ModelScores, decide

    holdout = model_registry.stored_reference(version, settings).holdout

    def scored(model: Any, probability: np.ndarray) -> ModelScores:
        predicted = np.asarray(model.predict(holdout[list(FEATURES)])) == POSITIVE
        return ModelScores(holdout[LABEL].to_numpy() == POSITIVE, probability, predicted)

    stored_probability = holdout[model_registry.PROBABILITY].to_numpy(dtype="float64")
    candidate = scored(model_registry.load_model(version, settings), stored_probability)
    champion_version = model_registry.champion_version(settings)
    if champion_version == str(version):
        champion_version = None
    champion = None
    if champion_version is not None:
        champion_model = model_registry.load_model(champion_version, settings)
        champion = scored(champion_model, probability_malignant(champion_model, holdout))
    sites = holdout[SITE].astype(str).to_numpy()
    decision = decide(candidate, champion, sites, protocol, thresholds=thresholds, champion_version=champion_version)
    if champion_version is not None:
        shared = _rows_champion_trained_on(champion_version, holdout, settings)
        if shared != 0:
            note = (
                f"champion v{champion_version} trained on {shared} of these {len(holdout)} hold-out rows "
                "(from before the hash hold-out): the comparison favours the champion"
                if shared
                else f"champion v{champion_version} stored no training rows: overlap with this hold-out unknown"
            )
            decision = decision.model_copy(update={"reasons": [*decision.reasons, note]})
    return decision


def _rows_champion_trained_on(champion: str, holdout: pd.DataFrame, settings: Settings) -> int | None:
    """How many of ``holdout``'s rows the champion trained on (None when its run stored no rows)."""
    from pipelines.holdout import row_keys

    try:
        trained = model_registry.stored_reference(champion, settings).train
    except model_registry.MissingReference:
        return None
    return int(np.isin(row_keys(holdout), row_keys(trained)).sum())


def short_reason(decision: GateDecision) -> str:
    """The verdict and the checks that failed, short enough for a tag or a table cell."""
    failed = [check.reason for check in decision.checks if check.status == "failed"]
    text = decision.reasons[0] + (": " + "; ".join(failed) if failed else "")
    return text if len(text) <= SHORT_REASON_CHARS else text[: SHORT_REASON_CHARS - 1] + "…"


def decision_summary(decision: GateDecision) -> dict[str, Any]:
    """The figures a reviewer reads first (overall and per site), small enough for an audit entry."""

    def figure(value: Any) -> dict[str, float] | None:
        if value is None:
            return None
        return {"value": round(value.value, 4), "lower": round(value.lower, 4), "upper": round(value.upper, 4)}

    def proportions(group: Any) -> dict[str, Any]:
        return {name: figure(getattr(group.candidate, name)) for name in ("sensitivity", "specificity")}

    overall = decision.overall
    return {
        "passed": decision.passed,
        "protocol_version": decision.protocol_version,
        "protocol_sha256": decision.protocol_sha256,
        "champion_version": decision.champion_version,
        "thresholds_below_protocol": decision.thresholds_below_protocol,
        "overall": {
            "rows": overall.rows,
            "malignant": overall.malignant,
            **proportions(overall),
            "roc_auc": figure(overall.candidate.roc_auc),
            "auc_difference_vs_champion": figure(overall.auc_difference),
        },
        "sites": {
            site: {"status": group.status, "rows": group.rows, "malignant": group.malignant, **proportions(group)}
            for site, group in decision.sites.items()
        },
        "failed": [check.reason for check in decision.checks if check.status == "failed"],
    }


def stored_decision(run_id: str, settings: Settings) -> GateDecision | None:
    """The gate decision a training run stored (``gate/decision.json``), or None when it has none."""
    import mlflow.artifacts

    from pipelines.gate import GateDecision

    client = model_registry.client(settings)  # also points mlflow.artifacts at the medops store
    if not any(item.path == DECISION_ARTIFACT for item in client.list_artifacts(run_id, "gate")):
        return None
    return GateDecision.model_validate(mlflow.artifacts.load_dict(f"runs:/{run_id}/{DECISION_ARTIFACT}"))


def register_version(
    run_id: str,
    fit: FitResult,
    settings: Settings,
    *,
    thresholds: Mapping[str, float | None] | None = None,
    approval_reasons: Sequence[str] = (),
    approved_by: str | None = None,
    approval_reason: str | None = None,
    trigger: str = "manual",
    airflow_run_id: str | None = None,
    actor: str = governance.SCHEDULER,
) -> TrainResult:
    """Register the run's model as a version with ``@challenger``, gate it, and publish its model card.

    The gate (:func:`judge_version`) judges the version on the hold-out rows the run stored; the
    decision goes to the run (``gate/decision.json``, ``gate_*`` metrics), to the version's tags
    (with what needs a person's approval, ``approval_reasons``) and to the audit trail, with
    ``approved_by``'s approval when given. ``@champion`` is left to :func:`promote`, so that a
    person can approve in between. Run twice for the same run (a retried task), it reuses the
    version the first call made. A model medops could not load safely is refused here
    (:func:`pipelines.model_registry.register_trusted`).
    """
    import time

    from mlflow.entities import Metric

    from pipelines import model_card
    from pipelines.protocol import gate_thresholds, load_protocol

    protocol = load_protocol()
    limits = gate_thresholds(protocol, thresholds)
    mlflow_client = model_registry.client(settings)
    found = mlflow_client.search_model_versions(f"name = '{settings.model_name}' and run_id = '{run_id}'")
    if found:  # a retried register step: the version the first call made
        version = str(min(int(item.version) for item in found))
    else:
        (output,) = mlflow_client.get_run(run_id).outputs.model_outputs
        version = model_registry.register_trusted(f"models:/{output.model_id}", settings)
    mlflow_client.set_registered_model_alias(settings.model_name, model_registry.CHALLENGER, version)

    decision = judge_version(version, settings, protocol, limits)
    mlflow_client.log_text(run_id, json.dumps(decision.to_dict(), indent=1) + "\n", DECISION_ARTIFACT)
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, 0) for key, value in decision.metrics().items()]
    mlflow_client.log_batch(run_id, metrics=metrics)
    reason = short_reason(decision)
    approvals = list(approval_reasons)
    model_registry.tag_version(
        version,
        {
            "data_version": fit.data_version,
            "data_dvc_md5": fit.data["dvc_md5"],
            "threshold": f"{fit.threshold:.6f}",
            "family": fit.family,
            "roc_auc": _figure(fit.metrics["roc_auc"], 4),
            "sensitivity": _figure(fit.metrics["sensitivity"], 4),
            **_verdict_tags(decision, reason, decision.champion_version),
            "protocol_version": str(decision.protocol_version),
            "protocol_sha256": decision.protocol_sha256,
            **{
                f"{name}_lower": f"{getattr(decision.overall.candidate, name).lower:.4f}"
                for name in ("sensitivity", "specificity", "roc_auc")
                if getattr(decision.overall.candidate, name) is not None
            },
            **_holdout_tags(fit.holdout),
            "approval_required": "; ".join(approvals)[: SHORT_REASON_CHARS * 4],
            "trigger": trigger,
            "airflow_run_id": airflow_run_id or "",
            "airflow_run_url": links.airflow_run(settings, "train_model", airflow_run_id) if airflow_run_id else "",
        },
        settings,
    )
    governance.record(
        "gate_decision",
        actor=actor,
        reason=reason,
        settings=settings,
        links={
            "data_version": fit.data_version,
            "report": f"runs:/{run_id}/{DECISION_ARTIFACT}",
            "airflow_run_id": airflow_run_id,
        },
        details=decision_summary(decision) | {"approval_required": approvals},
        run_id=run_id,
        model_version=version,
    )
    if approved_by:
        record_approval(version, approved_by, approval_reason, settings, reasons=approvals, entered_by=actor)
    model_card.publish(version, settings)
    log.info("model version page: %s", links.mlflow_model_version(settings, settings.model_name, version))
    return TrainResult(
        run_id=run_id,
        model_version=version,
        family=fit.family,
        threshold=fit.threshold,
        data_version=fit.data_version,
        metrics=fit.metrics,
        gate=decision,
        approval_reasons=approvals,
        cv_roc_auc=fit.cv_roc_auc,
        holdout=fit.holdout,
    )


def _figure(value: float | int | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _verdict_tags(decision: GateDecision, reason: str, champion: str | None) -> dict[str, str]:
    """The gate's verdict as version tags, against ``champion`` (the reason cut to a tag's length)."""
    return {
        "champion_compared": champion or "",
        "gate_passed": str(decision.passed).lower(),
        "gate_decision": "passed" if decision.passed else "rejected",
        "gate_reason": reason[:SHORT_REASON_CHARS],
    }


def record_approval(
    version: str,
    approved_by: str,
    reason: str | None,
    settings: Settings,
    *,
    reasons: Sequence[str] = (),
    entered_by: str | None = None,
) -> None:
    """Record a named person's approval of a model version's promotion in the audit trail (once per person)."""
    person = governance.named_person(approved_by, "approved_by")
    text = (reason or "").strip()
    if not text:
        raise ValueError("approval reason: say why the change is acceptable (--reason TEXT)")
    if any(entry.actor == person for entry in governance.entries_about(version, settings, ("approval",))):
        return
    run_id = model_registry.client(settings).get_model_version(settings.model_name, str(version)).run_id
    governance.record(
        "approval",
        actor=person,
        reason=text,
        settings=settings,
        details={"approved": list(reasons), "entered_by": entered_by or person},
        run_id=run_id,
        model_version=str(version),
    )
    model_registry.tag_version(version, {"approved_by": person}, settings)


def train_model(
    settings: Settings,
    *,
    data_version: str | None = None,
    families: list[str] | None = None,
    thresholds: Mapping[str, float | None] | None = None,
    trigger: str = "manual",
    airflow_run_id: str | None = None,
    actor: str = governance.SCHEDULER,
    approved_by: str | None = None,
    approval_reason: str | None = None,
) -> TrainResult:
    """Fit, log and register in one call (the command line); the work directory is removed after.

    A change the modification protocol reserves for a person (thresholds below its floors, say) is
    refused before any training unless ``approved_by`` names who approved it and
    ``approval_reason`` says why; the refusal or the approval goes to the audit trail.
    """
    gate = plan_gate(settings, families=families, form=thresholds, trigger=trigger)
    chosen, reasons = gate["thresholds"], gate["approval_reasons"]
    if reasons and not approved_by:
        governance.record(
            "refusal",
            actor=actor,
            reason="training refused: needs a named person's approval: " + "; ".join(reasons),
            settings=settings,
            links={"data_version": data_version, "airflow_run_id": airflow_run_id},
            details={"approval_reasons": reasons, "gate_thresholds_set": chosen},
        )
        raise governance.ApprovalRequired(
            f"needs a named person's approval under the modification protocol: {'; '.join(reasons)}. "
            "Give --approved-by NAME --reason TEXT"
        )
    if approved_by:
        governance.named_person(approved_by, "approved_by")
        if not (approval_reason or "").strip():
            raise ValueError("approval reason: say why the change is acceptable (--reason TEXT)")
    fit = fit_candidate(settings, data_version, families)
    steps = {"thresholds": thresholds, "trigger": trigger, "airflow_run_id": airflow_run_id, "actor": actor}
    run_id = log_run(fit, settings, **steps)
    approval = {"approval_reasons": reasons, "approved_by": approved_by, "approval_reason": approval_reason}
    result = register_version(run_id, fit, settings, **steps, **approval)
    shutil.rmtree(fit.work_dir, ignore_errors=True)  # the run and the version hold copies of everything
    return result


def _passes_against(version: str, champion: str | None, settings: Settings, *, actor: str) -> bool:
    """Judge ``version`` again (same protocol and thresholds) against the champion another training
    promoted since this version's gate; call with :func:`model_registry.champion_lock` held."""
    from pipelines.protocol import load_protocol

    run_id = model_registry.client(settings).get_model_version(settings.model_name, version).run_id
    stored = stored_decision(run_id, settings)
    decision = judge_version(version, settings, load_protocol(), stored.thresholds if stored else None)
    reason = f"judged again: @champion moved to v{champion} since this version's gate. {short_reason(decision)}"
    model_registry.tag_version(version, _verdict_tags(decision, reason, champion), settings)
    governance.record(
        "gate_decision",
        actor=actor,
        reason=reason,
        settings=settings,
        details=decision_summary(decision),
        run_id=run_id,
        model_version=version,
    )
    return decision.passed


def promote(
    result_or_version: TrainResult | str,
    settings: Settings,
    *,
    approved_by: str | None = None,
    approval_reason: str | None = None,
    actor: str = governance.SCHEDULER,
) -> bool:
    """Move ``@champion`` to a version whose gate passed; returns whether it moved.

    A version whose promotion needs approval (tag ``approval_required``) moves only with
    ``approved_by`` naming a person; the approval and the promotion go to the audit trail and the
    model card. When another training moved ``@champion`` since this version's gate, it is judged
    again against the new champion and moves only if it passes.
    """
    from pipelines import model_card

    version = str(result_or_version.model_version if isinstance(result_or_version, TrainResult) else result_or_version)
    tags = model_registry.version_tags(version, settings)
    if tags.get("gate_passed") != "true":
        model_registry.tag_version(version, {"gate_decision": "rejected"}, settings)
        return False
    needed = tags.get("approval_required", "")
    if needed and not (approved_by or "").strip():
        raise governance.ApprovalRequired(
            f"model version {version}: promotion needs a named person's approval ({needed}); nobody approved it"
        )
    person = governance.named_person(approved_by, "approved_by") if approved_by else None
    if person is not None:
        reason = approval_reason or f"approved the promotion of model version {version}"
        record_approval(version, person, reason, settings, reasons=[needed] if needed else [], entered_by=actor)
    # Two trainings may reach here at once: the champion is read, judged against, moved and the move
    # audited by one at a time, so the audit trail's promotions are in the order the alias moved.
    with model_registry.champion_lock(settings):
        previous = model_registry.champion_version(settings)
        compared = tags.get("champion_compared") or None
        if previous not in (compared, version) and not _passes_against(version, previous, settings, actor=actor):
            return False
        model_registry.set_champion(version, settings)
        promoted = {"gate_decision": "promoted", "previous_champion": previous or ""}
        model_registry.tag_version(version, promoted | ({"approved_by": person} if person else {}), settings)
        run_id = model_registry.client(settings).get_model_version(settings.model_name, version).run_id
        governance.record(
            "promotion",
            actor=person or actor,
            reason=f"@champion -> v{version} (was {f'v{previous}' if previous else 'none'}): gate passed"
            + (f", approved by {person}" if person else ""),
            settings=settings,
            links={"data_version": tags.get("data_version"), "previous_champion": previous},
            run_id=run_id,
            model_version=version,
        )
    model_card.publish(version, settings)
    return True
