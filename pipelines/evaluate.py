"""Clinical metrics of a fitted classifier on labelled rows; malignant is the positive class."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipelines.schema import FEATURES, LABEL, POSITIVE


@dataclass(frozen=True)
class Evaluation:
    """Metrics plus the probabilities and decisions behind them (for plots)."""

    metrics: dict[str, float]
    probability_malignant: np.ndarray
    is_malignant: np.ndarray
    predicted_malignant: np.ndarray


def probability_malignant(model, features: pd.DataFrame) -> np.ndarray:
    """The model's probability of the positive class, whatever order its classes are in."""
    column = list(model.classes_).index(POSITIVE)
    return model.predict_proba(features[list(FEATURES)])[:, column]


def clinical_metrics(is_malignant: np.ndarray, probability: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """ROC AUC, sensitivity, specificity, PPV, NPV, F1 and Brier score for malignant."""
    from sklearn.metrics import brier_score_loss, roc_auc_score

    tp = int(np.sum(predicted & is_malignant))
    fn = int(np.sum(~predicted & is_malignant))
    tn = int(np.sum(~predicted & ~is_malignant))
    fp = int(np.sum(predicted & ~is_malignant))

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    sensitivity, ppv = ratio(tp, tp + fn), ratio(tp, tp + fp)
    return {
        "roc_auc": float(roc_auc_score(is_malignant, probability))
        if 0 < is_malignant.sum() < len(is_malignant)
        else float("nan"),
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "ppv": ppv,
        "npv": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "brier": float(brier_score_loss(is_malignant, probability)),
        "accuracy": ratio(tp + tn, len(is_malignant)),
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "n": len(is_malignant),
    }


def evaluate_model(model, rows: pd.DataFrame) -> Evaluation:
    """Score labelled rows with the model's own operating threshold and compute the metrics."""
    probability = probability_malignant(model, rows)
    predicted = np.asarray(model.predict(rows[list(FEATURES)])) == POSITIVE
    is_malignant = rows[LABEL].to_numpy() == POSITIVE
    return Evaluation(clinical_metrics(is_malignant, probability, predicted), probability, is_malignant, predicted)


def evaluation_figures(evaluation: Evaluation) -> dict[str, object]:
    """ROC curve, confusion matrix and calibration plot as matplotlib figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import CalibrationDisplay
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    figures = {}
    fig, ax = plt.subplots(figsize=(5, 5))
    RocCurveDisplay.from_predictions(evaluation.is_malignant, evaluation.probability_malignant, ax=ax, name="malignant")
    ax.set_title("ROC (malignant positive)")
    figures["roc_curve.png"] = fig
    fig, ax = plt.subplots(figsize=(5, 5))
    labels = np.where(evaluation.is_malignant, "malignant", "benign")
    predicted = np.where(evaluation.predicted_malignant, "malignant", "benign")
    ConfusionMatrixDisplay.from_predictions(labels, predicted, labels=["malignant", "benign"], ax=ax, colorbar=False)
    ax.set_title("Confusion matrix at the operating threshold")
    figures["confusion_matrix.png"] = fig
    fig, ax = plt.subplots(figsize=(5, 5))
    CalibrationDisplay.from_predictions(
        evaluation.is_malignant, evaluation.probability_malignant, n_bins=8, ax=ax, name="malignant"
    )
    ax.set_title("Calibration")
    figures["calibration.png"] = fig
    return figures
