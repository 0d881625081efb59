"""Evaluation: metrics (JSON-able dict), a terminal table, PNG plots and the run report."""

from dcube.evaluate.metrics import compute_metrics, format_table, predict, select_score, validate_inputs
from dcube.evaluate.plots import plot_confusion, plot_curves, plot_roc
from dcube.evaluate.report import metrics_filename, write_report

__all__ = [
    "compute_metrics",
    "format_table",
    "metrics_filename",
    "plot_confusion",
    "plot_curves",
    "plot_roc",
    "predict",
    "select_score",
    "validate_inputs",
    "write_report",
]
