"""Linear probes on pooled feature maps: the step-1 validation probe (``diffusion.epochs: auto``) and
the cross-validated score of the latent analysis."""

from __future__ import annotations

import numpy as np
import torch



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

