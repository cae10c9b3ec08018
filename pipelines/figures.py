"""Plots of a model's evaluation for the MLflow run: ROC, confusion matrix, calibration.

Apart from :mod:`pipelines.metrics` so that the serving Bento, which needs the metrics, does not
carry matplotlib.
"""

from __future__ import annotations

import numpy as np

from pipelines.metrics import Evaluation


def evaluation_figures(evaluation: Evaluation) -> dict[str, object]:
    """ROC curve, confusion matrix and calibration plot as matplotlib figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import CalibrationDisplay
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay, roc_curve

    figures = {}
    fig, ax = plt.subplots(figsize=(5, 5))
    labels = np.where(evaluation.is_malignant, "malignant", "benign")
    fpr, tpr, _ = roc_curve(labels, evaluation.probability_malignant, pos_label="malignant")
    # The legend shows the run's roc_auc metric to the same 4 decimals, not sklearn's own 2-decimal rounding.
    auc = evaluation.metrics.get("roc_auc")
    name = f"malignant (AUC = {auc:.4f})" if auc is not None else "malignant"
    RocCurveDisplay(fpr=fpr, tpr=tpr, pos_label="malignant").plot(ax=ax, name=name)
    ax.set_title("ROC on the hold-out rows (malignant positive)")
    figures["roc_curve.png"] = fig
    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")  # room for the axis labels
    predicted = np.where(evaluation.predicted_malignant, "malignant", "benign")
    ConfusionMatrixDisplay.from_predictions(labels, predicted, labels=["malignant", "benign"], ax=ax, colorbar=False)
    ax.set_xlabel("Predicted diagnosis")
    ax.set_ylabel("True diagnosis")
    ax.set_title("Confusion matrix at the operating threshold")
    figures["confusion_matrix.png"] = fig
    fig, ax = plt.subplots(figsize=(5, 5))
    CalibrationDisplay.from_predictions(
        evaluation.is_malignant, evaluation.probability_malignant, n_bins=8, ax=ax, name="malignant"
    )
    ax.set_title("Calibration")
    figures["calibration.png"] = fig
    return figures
