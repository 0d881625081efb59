"""Linear probe on frozen ImageNet features: the cheapest honest baseline.

Images -> frozen EfficientNet-Lite0 (ImageNet weights) -> global average pooled last-stage
features (1280 dims) -> standardised -> scikit-learn logistic regression. The inverse
regularisation C is chosen on the VALIDATION split (``score_fn``), never on test.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dcube.classify.subfeatures import build_plain_classifier

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


@torch.no_grad()
def frozen_embeddings(images: torch.Tensor, batch_size: int = 128, device="cpu",
                      progress: bool = True) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] -> (N, 1280) pooled EfficientNet-Lite0 ImageNet features.

    Raises ImportError when the pretrained weights are not installed (a probe on a random
    network would be meaningless, so there is no fallback here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plain builder warns and falls back when weights are missing
        try:
            model = build_plain_classifier("efficientnet-lite0", images.shape[1], 2, images.shape[2])
        except Warning as w:
            raise ImportError(f"linear probe needs the EfficientNet-Lite0 ImageNet weights: {w}") from None
    model = model.to(device).eval()
    out = []
    for s in tqdm(range(0, len(images), batch_size), desc="frozen features", disable=not progress):
        x = model.pre(images[s:s + batch_size].to(device))
        out.append(model.net.extract_features(x).mean((2, 3)).cpu())
    return torch.cat(out).numpy()


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                     score_fn: Callable[[np.ndarray, np.ndarray], float], seed: int = 0,
                     c_grid: Sequence[float] = C_GRID) -> dict:
    """Fit one logistic regression per C, keep the best on validation -> {model, C, val_score, scores}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best, scores = None, {}
    for c in c_grid:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, random_state=seed))
        clf.fit(train_x, train_y)
        scores[c] = float(score_fn(val_y, clf.predict_proba(val_x)))
        if best is None or scores[c] > best[1]:
            best = (clf, scores[c], c)
    return {"model": best[0], "val_score": best[1], "C": best[2], "scores": scores}
