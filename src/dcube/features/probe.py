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


def validation_probe(train_maps: dict[str, torch.Tensor], y_train: torch.Tensor, val_maps: dict[str, torch.Tensor],
                     y_val: torch.Tensor, Cs=(0.01, 0.1, 1.0)) -> tuple[float, dict]:
    """The best validation ROC-AUC (one-vs-rest macro; balanced accuracy when a class is absent from
    validation) of a standardised logistic regression on channel-pooled features, over layers and C:
    fitted on TRAINING rows, scored on VALIDATION rows. Returns (score, {"layer", "C", "per_layer"})."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ytr, yva = y_train.numpy(), y_val.numpy()
    classes = np.unique(ytr)
    per_layer, best = {}, (-np.inf, None, None)
    for name in train_maps:
        xtr = train_maps[name].float().mean(dim=(2, 3)).numpy()
        xva = val_maps[name].float().mean(dim=(2, 3)).numpy()
        layer_best = -np.inf
        for c in Cs:
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(xtr, ytr)
            if set(np.unique(yva)) == set(classes):
                p = clf.predict_proba(xva)
                score = roc_auc_score(yva, p[:, 1]) if len(classes) == 2 else roc_auc_score(yva, p, multi_class="ovr")
            else:
                score = balanced_accuracy_score(yva, clf.predict(xva))
            layer_best = max(layer_best, float(score))
            if score > best[0]:
                best = (float(score), name, c)
        per_layer[name] = round(layer_best, 5)
    return best[0], {"layer": best[1], "C": best[2], "per_layer": per_layer}

