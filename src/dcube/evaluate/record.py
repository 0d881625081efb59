"""The one evaluation record every command that scores a test split writes (``metrics.json``): metrics with
95 % bootstrap CIs, and the per-image test probabilities, labels and ids that ``dcube compare`` pairs on."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dcube.evaluate.metrics import compute_metrics
from dcube.evaluate.stats import bootstrap_ci


def rounded(probs) -> list[list[float]]:
    return [[round(float(v), 6) for v in row] for row in np.asarray(probs).tolist()]


def evaluation_record(y_test, test_probs, test_ids: Sequence[str], class_names: list[str], seed: int = 0,
                      y_val=None, val_probs=None) -> dict:
    """``{"test": metrics + ci95, "test_probs", "test_labels", "test_ids"[, "val", "val_probs"]}`` (JSON-able)."""
    y_test, test_probs = np.asarray(y_test), np.asarray(test_probs)
    test = compute_metrics(y_test, test_probs, class_names)
    test["ci95"] = bootstrap_ci(y_test, test_probs, seed=seed)
    out = {"test": test, "test_probs": rounded(test_probs), "test_labels": y_test.tolist(), "test_ids": list(test_ids)}
    if y_val is not None:
        y_val, val_probs = np.asarray(y_val), np.asarray(val_probs)
        val = compute_metrics(y_val, val_probs, class_names)
        val["ci95"] = bootstrap_ci(y_val, val_probs, seed=seed)
        out |= {"val": val, "val_probs": rounded(val_probs)}
    return out
