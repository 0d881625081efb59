"""Kolmogorov-Smirnov layer selection: keep the layers whose features are NOT Gaussian.

The paper's Eq. 6, per image (dcube 0.1's pooled rule was removed in 1.0: CHANGELOG.md).
Each image's whole feature map (every channel and position; at most ``max_values`` (4096) values, taken at a fixed stride) is compared with a Gaussian of
that map's own mean and standard deviation: ``D_i = sup |F_i(x) - Phi((x - mu_i) / sd_i)|``. D is
an effect size: it does not shrink with the number of values the way a p-value does, so a layer at
2x2 and one at 28x28 are on one scale. The layer's statistic is the median over images of ``D_i``
minus the median of D for Gaussian values of the same count (Monte Carlo with a fixed seed: the
small-sample bias of D, ~0.9/sqrt(n), removed), so ~0 means "as Gaussian as Gaussian noise" at
any resolution. Its test: each image's p-value from that Monte Carlo null (moments estimated, as
Lilliefors), and the layer's p-value: how often the median D of as many Gaussian maps reaches the
observed median (the same Monte Carlo null, resampled). A layer is kept when it rejects AND its statistic is at least
``min_effect`` (0.02). Deterministic, and invariant to the order of the images.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import special

from dcube.utils.io import atomic_write
from dcube.utils.plotting import pyplot


@dataclass
class Selection:
    names: list[str]  # the selected layers, in forward order
    pvalues: dict[str, float]  # every layer's KS p-value
    statistics: dict[str, float]
    alpha: float
    fallback: bool = False  # True when no layer had p < alpha
    note: str = ""
    order: list[str] = field(default_factory=list)  # all layers, forward order
    method: str = "ks_map"
    min_effect: float | None = None  # method ks_map: the least effect size a kept layer needs

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=64)
def null_d(n: int, sims: int = 4000, seed: int = 0) -> np.ndarray:
    """Sorted KS distances of `sims` Gaussian samples of size n against N(mean, sd) of each sample."""
    rng = np.random.default_rng(seed + n)
    chunk = max(1, 2_000_000 // n)  # bounded memory for large maps
    return np.sort(np.concatenate([ks_distance(rng.standard_normal((min(chunk, sims - s), n)))
                                   for s in range(0, sims, chunk)]))


@functools.lru_cache(maxsize=64)
def null_medians(n: int, images: int, sims: int = 4000, draws: int = 2000, seed: int = 0) -> np.ndarray:
    """Null distribution of the median over `images` Gaussian maps of n values of D: medians of
    `images` draws from :func:`null_d` (its bulk, which `sims` samples estimate well)."""
    null = null_d(n, sims)
    rng = np.random.default_rng(seed + 7 * n + images)
    return np.median(null[rng.integers(0, len(null), size=(draws, images))], axis=1)


def ks_distance(v: np.ndarray) -> np.ndarray:
    """Rows of v (M, n): KS distance of each row to the Gaussian with that row's mean and sd
    (vectorised: scipy.stats.kstest takes one sample per call)."""
    v = np.asarray(v, dtype=np.float64)
    n = v.shape[1]
    sd = v.std(axis=1, keepdims=True)
    z = np.sort((v - v.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1.0), axis=1)
    cdf = special.ndtr(z)
    i = np.arange(1, n + 1)
    d = np.maximum((i / n - cdf).max(axis=1), (cdf - (i - 1) / n).max(axis=1))
    return np.where(sd[:, 0] > 1e-12, d, 0.0)


def map_values(fmap: torch.Tensor, max_values: int) -> np.ndarray:
    """(N, n) values of each image's map, every `stride`-th of the flattened (C, h, w) map."""
    flat = fmap.float().flatten(1)
    stride = max(1, -(-flat.shape[1] // max_values))
    return flat[:, ::stride].numpy()


def ks_map_scores(maps: dict[str, torch.Tensor], alpha: float = 0.05, max_values: int = 4096,
                  sims: int = 4000) -> dict[str, dict]:
    """Per layer: ``effect`` (median D minus the null median), ``d_median``, ``pvalue`` (of that
    median under Gaussian maps), ``share`` (images whose own p-value is below alpha)."""
    out = {}
    for name, fmap in maps.items():
        v = map_values(fmap, max_values)
        d = ks_distance(v)
        if (v.std(axis=1) <= 1e-12).all():  # constant layer
            out[name] = {"effect": 0.0, "d_median": 0.0, "pvalue": 1.0, "share": 0.0, "values": v.shape[1]}
            continue
        null = null_d(v.shape[1], sims)
        p_img = (1 + len(null) - np.searchsorted(null, d, side="left")) / (1 + len(null))
        medians = null_medians(v.shape[1], len(d), sims)
        med = float(np.median(d))
        p_layer = (1 + int((medians >= med).sum())) / (1 + len(medians))
        out[name] = {"effect": med - float(np.median(null)), "d_median": med, "pvalue": float(p_layer),
                     "share": float((p_img < alpha).mean()), "values": v.shape[1]}
    return out


def select_ks_map(maps: dict[str, torch.Tensor], alpha: float = 0.05, min_effect: float = 0.02,
                  max_values: int = 4096, fallback_k: int = 2, max_layers: int | None = None,
                  keep: str = "least_gaussian") -> Selection:
    """The paper's Eq. 6 rule (module docstring): non-Gaussian layers, largest effect first.
    ``keep="most_gaussian"`` is the paper's Table VI ablation: as many layers as the rule keeps, taken
    from the other end (smallest effect first)."""
    if keep not in ("least_gaussian", "most_gaussian"):
        raise ValueError(f"features.ks_keep: {keep!r} is not 'least_gaussian' or 'most_gaussian'")
    order = list(maps)
    sc = ks_map_scores(maps, alpha, max_values)
    pvals = {n: sc[n]["pvalue"] for n in order}
    effect = {n: sc[n]["effect"] for n in order}
    ranked = sorted(order, key=lambda n: -effect[n])
    chosen = [n for n in ranked if pvals[n] < alpha and effect[n] >= min_effect]
    if keep == "most_gaussian":
        n_keep = len(chosen) or fallback_k
        n_keep = min(n_keep, max_layers) if max_layers is not None else n_keep
        worst = ranked[::-1][:n_keep]
        return Selection([n for n in order if n in worst], pvals, effect, alpha, False,
                         f"ablation: kept the {len(worst)} MOST Gaussian layers (smallest effect)", order,
                         method="ks_map", min_effect=min_effect)
    fallback, note = False, ""
    if not chosen:
        chosen, fallback = ranked[:fallback_k], True
        note = (f"no layer was non-Gaussian (p < {alpha} and effect >= {min_effect}); kept the "
                f"{len(chosen)} with the largest effect {chosen} instead")
    if max_layers is not None and len(chosen) > max_layers:
        note = (note + "; " if note else "") + f"{len(chosen)} layers qualified; kept the {max_layers} largest effects"
        chosen = chosen[:max_layers]
    names = [n for n in order if n in chosen]
    return Selection(names, pvals, effect, alpha, fallback, note, order, method="ks_map", min_effect=min_effect)


def plot_pvalues(sel: Selection, path: str | Path) -> Path:
    """Bar plot of -log10(p) per layer with the alpha threshold line."""
    plt = pyplot()

    names = sel.order
    effect = sel.method in ("ks_map", "all")
    y = [sel.statistics[n] if effect else -np.log10(max(sel.pvalues[n], 1e-300)) for n in names]
    colors = ["tab:blue" if n in sel.names else "tab:gray" for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(names) + 1), 3))
    ax.bar(range(len(names)), y, color=colors)
    if not effect:
        ax.axhline(-np.log10(sel.alpha), color="tab:red", ls="--", label=f"p = {sel.alpha}")
        ax.legend(fontsize=8)
    elif sel.min_effect is not None:
        ax.axhline(sel.min_effect, color="tab:red", ls="--", label=f"least effect {sel.min_effect:g}")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("KS distance D above Gaussian noise's" if effect else "-log10 KS p-value")
    ax.set_title(("per-image KS distance (paper Eq. 6), median over images" if effect else "KS test per layer")
                 + f"\n(blue = selected{': ' + sel.method if sel.method != 'ks' else ': not Gaussian'})", fontsize=9)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out
