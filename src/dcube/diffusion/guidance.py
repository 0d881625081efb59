"""Classifier-free guidance (Ho & Salimans 2022) on the reserved null class.

Training: :func:`drop_labels` replaces the condition of a random fraction of the images by
the null class (row ``num_classes`` of the class embedding, ``Denoiser.null_index``), so one
network learns both the conditional and the unconditional noise prediction.

Sampling: :func:`guided_eps` mixes the two,
``eps = eps_cond + w * (eps_cond - eps_null)``; ``w = 0`` is the plain conditional model
(and skips the null forward pass).
"""

from __future__ import annotations

import torch


def drop_labels(cond: torch.Tensor, p: float, generator: torch.Generator, start: int = 0) -> torch.Tensor:
    """Condition rows ``start:`` are replaced by the one-hot null class with probability `p`.

    `cond` is (N, K) class probabilities; the result has K + 1 columns (the last one is the
    null class), which the soft class embedding maps exactly like the K-column input.
    The random draw comes from `generator` (after every other draw of the step), so a
    resumed run draws the same mask.
    """
    if not 0 <= p < 1:
        raise ValueError(f"diffusion.class_dropout: must lie in [0, 1), got {p}")
    n, k = cond.shape
    out = torch.cat([cond, torch.zeros(n, 1, dtype=cond.dtype)], dim=1)
    drop = torch.rand(n, generator=generator) < p
    drop[:start] = False
    out[drop] = 0.0
    out[drop, k] = 1.0
    return out


def guided_eps(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guidance: float) -> torch.Tensor:
    """Noise prediction for class ids `y` under guidance scale `guidance` (>= 0)."""
    if guidance < 0:
        raise ValueError(f"guidance: must be >= 0, got {guidance}")
    if guidance == 0:
        return model(x, t, y)
    null = torch.full_like(y, model.null_index)
    eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    return eps_c + guidance * (eps_c - eps_u)
