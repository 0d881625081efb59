"""The D-Cube contrastive loss on middle-block features, and batch pairing.

During diffusion training every image ``x_i`` is paired with a partner ``x_j``
(:func:`pair_indices`); both are noised with the *same* timestep and the *same* noise,
and the middle-block features ``f1 = mid(x_i)``, ``f2 = mid(x_j)`` enter

    d     = || normalize(f1) - normalize(f2) ||_2          (features flattened per image)
    loss  = mean over pairs of   d^2                        if same class
                                 max(0, margin - d)^2       otherwise

Features are flattened and L2-normalised per image, so ``d`` lies in [0, 2] whatever
the block width or resolution (``d^2 = 2 - 2 cos``); a margin of 1.0 asks different-class
pairs to be at least 60 degrees apart. Same-class pairs are pulled together, and
different-class pairs closer than the margin are pushed apart. (``diffusion.contrastive_form:
normalized``, pairs from :func:`pair_indices`.)

:func:`contrastive_loss_paper` is the paper's Eq. 4 (``contrastive_form: paper``): on the RAW
features, ``D = ||f1 - f2||^2`` (squared L2 over the flattened map) and

    loss = mean over pairs of   D                  if same class
                                max(0, margin - D)  otherwise        (margin 0.1)

with the pairs drawn inside the batch by :func:`pair_within_batch`, so every image of the batch is
denoised exactly once (no row is replaced by a partner copy).

"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_EPS = 1e-12


def contrastive_loss(
    f1: torch.Tensor, f2: torch.Tensor, same: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """Contrastive loss between paired features.

    Args:
        f1, f2: features (N, ...) of the two images of each pair (any trailing shape,
            flattened per image; the same shape for both).
        same: bool (N,): True where the pair shares its class.
        margin: distance (on the unit sphere, in [0, 2]) different-class pairs must exceed.

    Returns:
        scalar: mean over the N pairs (0 for an empty batch, still connected to f1, f2).
    """
    if f1.shape != f2.shape:
        raise ValueError(f"f1 and f2 must have the same shape, got {tuple(f1.shape)} and {tuple(f2.shape)}")
    if f1.ndim < 1:
        raise ValueError("f1 and f2 must have a batch dimension")
    n = f1.shape[0]
    same = torch.as_tensor(same, device=f1.device).reshape(-1).bool()
    if same.shape[0] != n:
        raise ValueError(f"same must have shape ({n},), got {tuple(same.shape)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if n == 0:
        return (f1.sum() + f2.sum()) * 0.0
    a = F.normalize(f1.reshape(n, -1).float(), dim=1, eps=_EPS)
    b = F.normalize(f2.reshape(n, -1).float(), dim=1, eps=_EPS)
    d2 = (a - b).pow(2).sum(dim=1)
    # sqrt with eps: finite gradient at d = 0 (identical different-class features)
    d = torch.sqrt(d2 + _EPS)
    loss = torch.where(same, d2, F.relu(margin - d).pow(2))
    return loss.mean()


def pair_indices(labels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A partner index for every sample of a batch, half same-class, half different-class.

    For each i a fair coin (drawn from ``generator``) asks for a same-class or a
    different-class partner, drawn uniformly among the *other* samples of that kind; if
    that kind does not exist for i (its class is alone in the batch, or the batch holds one
    class) the other kind is used, and a sample alone in the batch is its own partner.
    Deterministic for a given generator state. The result is an index (not necessarily a
    permutation): pair i is (i, partner[i]); ``same = labels[partner] == labels``.

    Args:
        labels: int (N,) class ids.
        generator: torch.Generator (its device is used for the draws); None = global RNG.

    Returns:
        int64 (N,) on labels' device.
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {tuple(labels.shape)}")
    n = labels.shape[0]
    dev = generator.device if generator is not None else torch.device("cpu")
    lab = labels.to(dev)
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=labels.device)
    eye = torch.eye(n, dtype=torch.bool, device=dev)
    same_mask = (lab[:, None] == lab[None, :]) & ~eye
    diff_mask = lab[:, None] != lab[None, :]
    want_same = torch.rand(n, generator=generator, device=dev) < 0.5
    has_same = same_mask.any(dim=1)
    has_diff = diff_mask.any(dim=1)
    use_same = (want_same & has_same) | ~has_diff
    mask = torch.where(use_same[:, None], same_mask, diff_mask)
    mask = mask | (~mask.any(dim=1, keepdim=True) & eye)  # alone -> own partner
    scores = torch.rand(n, n, generator=generator, device=dev).masked_fill(~mask, -1.0)
    return scores.argmax(dim=1).to(labels.device)


def contrastive_loss_paper(f1: torch.Tensor, f2: torch.Tensor, same: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Eq. 4 of D-Cube on raw features: same class -> D, different -> max(0, margin - D), D = ||f1 - f2||^2."""
    if f1.shape != f2.shape:
        raise ValueError(f"f1 and f2 must have the same shape, got {tuple(f1.shape)} and {tuple(f2.shape)}")
    n = f1.shape[0]
    same = torch.as_tensor(same, device=f1.device).reshape(-1).bool()
    if same.shape[0] != n:
        raise ValueError(f"same must have shape ({n},), got {tuple(same.shape)}")
    if n == 0:
        return (f1.sum() + f2.sum()) * 0.0
    d2 = (f1.reshape(n, -1).float() - f2.reshape(n, -1).float()).pow(2).sum(dim=1)
    return torch.where(same, d2, F.relu(margin - d2)).mean()


def pair_within_batch(labels: torch.Tensor, generator: Optional[torch.Generator] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint pairs of a batch's rows: (anchors, partners, rest), together a permutation of the rows.

    Rows are taken in a seeded random order; each anchor gets, by a fair coin, a same-class or a
    different-class partner among the rows not yet paired (the other kind when that one is gone).
    An odd row out is `rest` (it is denoised, and not paired)."""
    labels = torch.as_tensor(labels)
    n = labels.shape[0]
    order = torch.randperm(n, generator=generator).tolist()
    coins = torch.rand(n, generator=generator).tolist()
    lab = labels.tolist()
    free = list(order)
    anchors, partners = [], []
    while len(free) >= 2:
        a = free.pop(0)
        same = [j for j in free if lab[j] == lab[a]]
        diff = [j for j in free if lab[j] != lab[a]]
        pool = same if (coins[a] < 0.5 and same) or not diff else diff
        b = pool[0]
        free.remove(b)
        anchors.append(a)
        partners.append(b)
    as_t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return as_t(anchors), as_t(partners), as_t(free)
