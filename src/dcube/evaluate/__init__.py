"""Evaluation: metrics (JSON-able dict), a terminal table, PNG plots, calibration and statistics."""

from dcube.evaluate.metrics import compute_metrics, format_table, predicted_labels, select_score, validate_inputs
from dcube.evaluate.plots import plot_confusion, plot_curves, plot_roc

__all__ = [
    "compute_metrics",
    "format_table",
    "plot_confusion",
    "plot_curves",
    "plot_roc",
    "predicted_labels",
    "select_score",
    "validate_inputs",
]
