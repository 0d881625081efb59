"""Seeded, deterministic split logic on label (and group) arrays; no file access.

Every function returns the same answer for the same inputs and seed, independent of the
platform: randomness comes only from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")


def allocate(counts: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Integer per-class quotas summing to `total` (clipped to [sum lo, sum hi]), proportional to
    `counts` by the largest-remainder method, each within [lo, hi]."""
    counts = np.asarray(counts, np.float64)
    lo, hi = np.minimum(lo, hi), np.asarray(hi)
    share = counts * total / counts.sum() if counts.sum() else np.zeros_like(counts)
    base = np.clip(np.floor(share).astype(np.int64), lo, hi)
    total = int(np.clip(total, lo.sum(), hi.sum()))
    frac = share - base
    while base.sum() < total:
        c = int(np.argmax(np.where(base < hi, frac, -np.inf)))
        base[c] += 1
        frac[c] -= 1
    while base.sum() > total:
        c = int(np.argmax(np.where(base > lo, base - share, -np.inf)))
        base[c] -= 1
    return base


def stratified_split(labels, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Assign 'train'/'val'/'test' to each item, keeping class ratios; every class keeps at
    least one training item. Split sizes are round(N * fraction) where the classes allow."""
    labels = np.asarray(labels)
    classes, inv = np.unique(labels, return_inverse=True)
    counts = np.bincount(inv, minlength=len(classes))
    n = len(labels)
    zero = np.zeros_like(counts)
    n_test = allocate(counts, round(n * test_fraction), zero, np.maximum(counts - 1, 0))
    n_val = allocate(counts, round(n * val_fraction), zero, np.maximum(counts - n_test - 1, 0))
    out = np.full(n, "train", dtype="<U5")
    rng = np.random.default_rng(seed)
    for c in range(len(classes)):
        perm = rng.permutation(np.flatnonzero(inv == c))
        out[perm[: n_test[c]]] = "test"
        out[perm[n_test[c]: n_test[c] + n_val[c]]] = "val"
    return out


def grouped_split(labels, groups, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Like :func:`stratified_split`, but all items of a group (patient) land in one split.

    Greedy: groups in a seeded random order, largest first, each goes to the split whose
    per-class deficit (relative to its target) it fills best.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    classes, inv = np.unique(labels, return_inverse=True)
    gnames, ginv = np.unique(groups, return_inverse=True)
    gcount = np.zeros((len(gnames), len(classes)))
    np.add.at(gcount, (ginv, inv), 1)
    counts = gcount.sum(0)
    fracs = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    target = fracs[:, None] * counts[None]
    cur = np.zeros_like(target)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(gnames))
    order = order[np.argsort(-gcount[order].sum(1), kind="stable")]
    assign = np.zeros(len(gnames), np.int64)
    active = np.flatnonzero(fracs > 0)
    for g in order:
        cost = ((cur[active] - target[active]) / counts) @ gcount[g]
        s = active[int(np.argmin(cost))]
        assign[g], cur[s] = s, cur[s] + gcount[g]
    for s in active[1:]:  # give an empty val/test split the smallest train group, if it can spare one
        train_groups = np.flatnonzero(assign == 0)
        if not (assign == s).any() and len(train_groups) > 1:
            assign[train_groups[np.argmin(gcount[train_groups].sum(1))]] = s
    return np.array(SPLITS, dtype="<U5")[assign[ginv]]


def nested_per_class(labels, k: int, seed) -> np.ndarray:
    """Sorted indices of the first `k` items of every class in a seeded per-class order (all of a smaller class):
    the subsets for k = 10, 50, 250 of one seed are nested, each containing the smaller ones."""
    labels = np.asarray(labels)
    keep = [np.random.default_rng([*np.atleast_1d(seed).tolist(), int(c)]).permutation(np.flatnonzero(labels == c))[:k]
            for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)


def stratified_subsample(labels, n: int, seed) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified subsample of size min(n, N); every class
    present keeps at least one item when n allows. `seed`: an int or a sequence of ints."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    classes, inv = np.unique(labels, return_inverse=True)
    counts = np.bincount(inv, minlength=len(classes))
    lo = np.ones_like(counts) if n >= len(classes) else np.zeros_like(counts)
    quota = allocate(counts, n, np.minimum(lo, counts), counts)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(inv == c))[: quota[c]] for c in range(len(classes))]
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)
