"""Layer selection by a linear probe: keep the layers whose pooled features best predict the
label, by cross-validation on the TRAINING split only (never validation or test).

An alternative to the paper's KS rule (``features.select: probe``). On BreastMNIST the KS rule
kept the two least Gaussian UNet blocks while a probe on the most Gaussian one (the middle
block) separated the classes best (see BENCHMARKS.md, ablations), so dcube offers both and
the ablation study compares them.
"""

from __future__ import annotations

import numpy as np
import torch

from dcube.features.ks import Selection, ks_pvalues


def probe_score(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> float:
    """Mean cross-validated balanced accuracy of a standardised logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = max(2, min(folds, int(np.bincount(y).min())))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, x, y, cv=cv, scoring="balanced_accuracy").mean())


def select_by_probe(maps: dict[str, torch.Tensor], labels: torch.Tensor, k: int = 2, folds: int = 5,
                    seed: int = 0, n_values: int = 1000, alpha: float = 0.05) -> Selection:
    """The `k` layers with the best CV balanced accuracy of a probe on channel-pooled features.

    The KS p-values are computed too (same sample), so the report and plot show both."""
    y = labels.numpy()
    if len(np.unique(y)) < 2:
        raise ValueError("features.select='probe': the training sample holds a single class")
    order = list(maps)
    scores = {n: probe_score(m.float().mean(dim=(2, 3)).numpy(), y, folds, seed) for n, m in maps.items()}
    ranked = sorted(order, key=lambda n: -scores[n])
    names = [n for n in order if n in ranked[:k]]
    pvals, statistics = ks_pvalues(maps, n_values, seed)
    note = "probe: " + ", ".join(f"{n}={scores[n]:.3f}" for n in ranked) + " (CV balanced accuracy, training split)"
    return Selection(names, pvals, statistics, alpha=alpha, fallback=False, note=note, order=order,
                     method="probe", probe_scores=scores)
