"""Train, evaluate, register and gate a diagnosis model on one data version.

A stratified hold-out (fixed seed) is kept aside; on the training rows a small cross-validated
search compares logistic regression, an SVM and gradient boosting, each a scikit-learn Pipeline
with scaling inside (fitted on training rows only). The operating threshold is chosen on
out-of-fold probabilities to meet the sensitivity target and is stored inside the model
(``FixedThresholdClassifier``), so every place that predicts uses it. The result is one MLflow
run and one registered version with ``@challenger``; ``@champion`` moves only through the gate.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medops.core.settings import Settings
from pipelines import data_registry, model_registry
from pipelines.metrics import evaluate_model, evaluation_figures, probability_malignant
from pipelines.schema import FEATURES, LABEL, POSITIVE

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


def trusted_types(model: Any) -> list[str]:
    """The scikit-learn types of a model we built ourselves, for MLflow's safe skops format.

    Loading trusts only these (stored in the MLmodel file), never arbitrary pickled code.
    """
    import skops.io

    untrusted = skops.io.get_untrusted_types(data=skops.io.dumps(model))
    foreign = [name for name in untrusted if not name.startswith(("sklearn.", "numpy.", "scipy."))]
    if foreign:
        raise TypeError(f"model holds types outside scikit-learn/numpy/scipy: {', '.join(foreign)}")
    return untrusted


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


def _champion_auc(test: pd.DataFrame, settings: Settings) -> tuple[str | None, float | None]:
    from sklearn.metrics import roc_auc_score

    version = model_registry.champion_version(settings)
    if version is None:
        return None, None
    champion = model_registry.load_model(version, settings)
    auc = roc_auc_score(test[LABEL] == POSITIVE, probability_malignant(champion, test))
    return version, float(auc)


def model_card(result: TrainResult, data: data_registry.DataVersion, config: GateConfig, settings: Settings) -> str:
    m = result.metrics
    return f"""# Model card: {settings.model_name} v{result.model_version}

**Intended use.** Decision support for classifying breast masses (fine-needle aspirate features) as
malignant or benign. Not a diagnosis on its own; a clinician reviews every case.

**Data.** Data version `{data.tag}` of the medops data registry (DVC hash `{data.dvc_md5}`, {data.rows} rows).
Stratified hold-out of {settings.test_size:.0%} (seed {settings.seed}) for evaluation.

**Model.** {result.family}, chosen by {settings.cv_folds}-fold cross-validated ROC AUC
({", ".join(f"{k} {v:.4f}" for k, v in result.cv_roc_auc.items())}).

**Operating point.** P(malignant) >= {result.threshold:.4f}, chosen on out-of-fold probabilities for
sensitivity >= {settings.sensitivity_target}. Missing a malignant case is the costly error.

**Hold-out metrics (malignant positive).** ROC AUC {m["roc_auc"]:.4f}, sensitivity {m["sensitivity"]:.3f},
specificity {m["specificity"]:.3f}, PPV {m["ppv"]:.3f}, NPV {m["npv"]:.3f}, F1 {m["f1"]:.3f},
Brier {m["brier"]:.4f} (TP {m["tp"]}, FN {m["fn"]}, TN {m["tn"]}, FP {m["fp"]}).

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
    """Train on a data version (latest by default), log one MLflow run, register it as ``@challenger``.

    The gate's decision is computed and tagged on the version; moving ``@champion`` is left to
    :func:`promote` so that a person can approve it in between.
    """
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from threadpoolctl import threadpool_limits

    families = list(families or FAMILIES)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown model family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    gate_config = gate_config or GateConfig.from_settings(settings)
    data_version = data_version or data_registry.latest_version(settings)
    if data_version is None:
        raise RuntimeError("the data registry has no data version yet: run `medops init` first")
    data = data_registry.describe_version(data_version, settings)
    frame = data_registry.load_version_frame(data_version, settings)
    train, test = split_rows(frame, settings)

    # One BLAS thread: on small data, OpenBLAS threads spin against each other and every other
    # process on the machine (search: 71 s with 2 threads vs 3-9 s with 1, measured here).
    with threadpool_limits(limits=1):
        family, estimator, cv_scores = search_best(train, families, settings)
        threshold = choose_threshold(estimator, train, settings.sensitivity_target, settings)
        model = fit_final(estimator, threshold, train)
        evaluation = evaluate_model(model, test)
        champion, champion_auc = _champion_auc(test, settings)
    decision = gate(evaluation.metrics, champion_auc, champion, gate_config)

    experiment_id = model_registry.ensure_experiment(settings)
    versions_seen = data_registry.list_versions(settings)[: data_registry.version_number(data_version)]
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{family}-{data_version}") as run:
        mlflow.set_tags(
            {
                "data_version": data_version,
                "data_dvc_md5": data.dvc_md5,
                "data_registry_commit": data.commit,
                "data_versions_seen": ",".join(versions_seen),
                "code_git_sha": model_registry.code_version(),
                "airflow_run_id": airflow_run_id or "",
                "trigger": trigger,
                "family": family,
            }
        )
        mlflow.log_params(
            {
                "family": family,
                **{
                    k: v
                    for k, v in estimator.get_params().items()
                    if k.startswith("model__") and isinstance(v, int | float | str | bool | None)
                },
                "threshold": round(threshold, 6),
                "sensitivity_target": settings.sensitivity_target,
                "seed": settings.seed,
                "test_size": settings.test_size,
                "cv_folds": settings.cv_folds,
                "train_rows": len(train),
                "test_rows": len(test),
                **{f"gate_{k}": v for k, v in asdict(gate_config).items()},
            }
        )
        mlflow.log_metrics({k: float(v) for k, v in evaluation.metrics.items()})
        mlflow.log_metrics({f"cv_roc_auc_{k}": v for k, v in cv_scores.items()})
        if champion_auc is not None:
            mlflow.log_metric("champion_roc_auc_same_rows", champion_auc)
        source = f"{settings.registry_dir}@{data_version}"
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        mlflow.log_input(
            mlflow.data.from_pandas(train, source=source, targets=LABEL, name=f"{data_version}-train"),
            context="training",
        )
        mlflow.log_input(
            mlflow.data.from_pandas(test, source=source, targets=LABEL, name=f"{data_version}-holdout"),
            context="evaluation",
        )
        for name, figure in evaluation_figures(evaluation).items():
            mlflow.log_figure(figure, name)
        features = test[list(FEATURES)]
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            skops_trusted_types=trusted_types(model),
            # Stated, not inferred: inference re-imports the model in a subprocess (~20 s here).
            pip_requirements=mlflow.sklearn.get_default_pip_requirements(include_skops=True),
            signature=infer_signature(features, model.predict(features)),
            input_example=features.head(3),
            registered_model_name=settings.model_name,
        )
        result = TrainResult(
            run_id=run.info.run_id,
            model_version=str(info.registered_model_version),
            family=family,
            threshold=threshold,
            data_version=data_version,
            metrics=evaluation.metrics,
            gate=decision,
            cv_roc_auc=cv_scores,
        )
        card = model_card(result, data, gate_config, settings)
        mlflow.log_text(card, "model_card.md")
        with tempfile.TemporaryDirectory() as tmp:
            rows = Path(tmp) / "evaluation_rows.csv"
            test.to_csv(rows, index=False)
            mlflow.log_artifact(str(rows))

    mlflow_client = model_registry.client(settings)
    mlflow_client.update_model_version(settings.model_name, result.model_version, description=card)
    mlflow_client.set_registered_model_alias(settings.model_name, model_registry.CHALLENGER, result.model_version)
    model_registry.tag_version(
        result.model_version,
        {
            "data_version": data_version,
            "data_dvc_md5": data.dvc_md5,
            "threshold": f"{threshold:.6f}",
            "family": family,
            "roc_auc": f"{evaluation.metrics['roc_auc']:.4f}",
            "sensitivity": f"{evaluation.metrics['sensitivity']:.4f}",
            "gate_passed": str(decision.passed).lower(),
            "gate_reasons": json.dumps(decision.reasons),
            "gate_decision": "passed" if decision.passed else "rejected",
            "trigger": trigger,
            "airflow_run_id": airflow_run_id or "",
        },
        settings,
    )
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
