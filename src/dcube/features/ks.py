"""Kolmogorov-Smirnov layer selection: keep the layers whose features are NOT Gaussian.

For each layer, the activations of a sample of training images are pooled per channel
(global average), standardised per channel, and `ks_values` of them drawn at random are
tested against N(0, 1) with ``scipy.stats.kstest``. Layers with p < alpha are kept (the
Gaussian-looking ones mostly carry noise). The sample size is fixed because with tens of
thousands of values every layer would reject normality.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import stats


@dataclass
class Selection:
    names: list[str]  # the selected layers, in forward order
    pvalues: dict[str, float]  # every layer's KS p-value
    statistics: dict[str, float]
    alpha: float
    fallback: bool = False  # True when no layer had p < alpha
    note: str = ""
    order: list[str] = field(default_factory=list)  # all layers, forward order
    method: str = "ks"  # ks | probe (dcube.features.probe)
    probe_scores: dict = field(default_factory=dict)  # layer -> CV balanced accuracy (method probe)

    def to_dict(self) -> dict:
        return asdict(self)


def standardised_values(fmap: torch.Tensor, n_values: int, rng: np.random.Generator) -> np.ndarray:
    """Channel-pooled activations (N, C), standardised per channel, `n_values` drawn."""
    pooled = fmap.float().mean(dim=(2, 3)).numpy()  # (N, C)
    sd = pooled.std(axis=0, keepdims=True)
    keep = sd[0] > 1e-12
    if not keep.any():
        return np.zeros(0)
    z = ((pooled[:, keep] - pooled[:, keep].mean(axis=0, keepdims=True)) / sd[:, keep]).ravel()
    z = z[np.isfinite(z)]
    if len(z) > n_values:
        z = rng.choice(z, size=n_values, replace=False)
    return z


def ks_pvalues(maps: dict[str, torch.Tensor], n_values: int, seed: int = 0) -> tuple[dict, dict]:
    """KS p-value and statistic of every layer against the standard normal."""
    pvals, statistics = {}, {}
    for name, fmap in maps.items():
        z = standardised_values(fmap, n_values, np.random.default_rng(seed))
        if len(z) < 8:  # constant layer: carries nothing, treat as uninformative
            pvals[name], statistics[name] = 1.0, 0.0
            continue
        res = stats.kstest(z, "norm")
        pvals[name], statistics[name] = float(res.pvalue), float(res.statistic)
    return pvals, statistics


def select_layers(maps: dict[str, torch.Tensor], alpha: float = 0.05, n_values: int = 1000,
                  fallback_k: int = 2, max_layers: int | None = None, seed: int = 0,
                  keep: str = "least_gaussian") -> Selection:
    """Select the non-Gaussian layers; see the module docstring. ``keep="most_gaussian"`` is the
    ablation: as many layers as the rule would keep, taken from the most Gaussian end."""
    if keep not in ("least_gaussian", "most_gaussian"):
        raise ValueError(f"features.ks_keep: {keep!r} is not 'least_gaussian' or 'most_gaussian'")
    order = list(maps)
    pvals, statistics = ks_pvalues(maps, n_values, seed)
    ranked = sorted(order, key=lambda n: (pvals[n], -statistics[n]))  # least Gaussian first
    if keep == "most_gaussian":
        n_keep = sum(pvals[n] < alpha for n in ranked) or fallback_k
        n_keep = min(n_keep, max_layers) if max_layers is not None else n_keep
        names = [n for n in order if n in ranked[::-1][:n_keep]]
        return Selection(names, pvals, statistics, alpha, False,
                         f"ablation: kept the {len(names)} MOST Gaussian layers", order)
    chosen = [n for n in ranked if pvals[n] < alpha]
    fallback, note = False, ""
    if not chosen:
        chosen = ranked[:fallback_k]
        fallback = True
        note = (f"no layer had p < {alpha}; kept the {len(chosen)} least Gaussian layers "
                f"{chosen} instead")
    if max_layers is not None and len(chosen) > max_layers:
        note = (note + "; " if note else "") + (
            f"{len(chosen)} layers had p < {alpha}; kept the {max_layers} with the smallest p")
        chosen = chosen[:max_layers]
    names = [n for n in order if n in chosen]
    return Selection(names, pvals, statistics, alpha, fallback, note, order)


def plot_pvalues(sel: Selection, path: str | Path) -> Path:
    """Bar plot of -log10(p) per layer with the alpha threshold line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcube.utils.io import atomic_write

    names = sel.order
    y = [-np.log10(max(sel.pvalues[n], 1e-300)) for n in names]
    colors = ["tab:blue" if n in sel.names else "tab:gray" for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(names) + 1), 3))
    ax.bar(range(len(names)), y, color=colors)
    ax.axhline(-np.log10(sel.alpha), color="tab:red", ls="--", label=f"p = {sel.alpha}")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("-log10 KS p-value")
    ax.set_title("KS test per layer\n(blue = selected: not Gaussian)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out
