"""Timestep x layer analysis: which (layer, t) of the frozen denoiser discriminate the classes.

For every t of ``AnalysisOptions.timesteps`` the training images (a stratified sample of
``images``) are noised at t with a noise fixed per image (``features.extract`` in
``xt`` mode, uniform class condition), every block is hooked and global-average pooled, and a
linear probe (scikit-learn: standardise + logistic regression) is cross-validated on the
training split (stratified k-fold) -> balanced accuracy. The zero-shot classifier restricted to
that single t gives a zero-shot accuracy per t. The recommended set is the best cell's t and
the ``top_layers`` best layers at that t, also written as ``features.*`` overrides. The options are
``dcube analyze``'s (``--timesteps``, ``--images``, ...), not the run's configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dcube.config import FeatureConfig
from dcube.data.splits import stratified_subsample
from dcube.diffusion.zeroshot import ZeroShotOptions, classify_zero_shot
from dcube.features.extract import extract
from dcube.features.probe import probe_score
from dcube.utils.io import atomic_write
from dcube.utils.plotting import pyplot


@dataclass
class AnalysisOptions:
    timesteps: list = field(default_factory=lambda: [10, 50, 100, 200, 400, 600, 800])  # the t of the probe grid
    images: int = 512  # training images the probes are fitted on (stratified)
    zs_images: int = 128  # training images of the zero-shot accuracy per t
    zs_trials: int = 4  # noise draws per t for it
    folds: int = 5  # probe cross-validation folds
    top_layers: int = 2  # layers in the recommended set

    def check(self, num_train_timesteps: int) -> None:
        """ValueError naming the option that is out of range."""
        if not self.timesteps:
            raise ValueError("--timesteps: must list at least one timestep")
        bad = [t for t in self.timesteps if not 0 <= int(t) < num_train_timesteps]
        if bad:
            raise ValueError(f"--timesteps: {bad} outside [0, {num_train_timesteps})")
        for name in ("images", "zs_images", "zs_trials", "folds", "top_layers"):
            if getattr(self, name) < 1 or (name == "folds" and self.folds < 2):
                raise ValueError(f"--{name.replace('_', '-')}: must be >= {2 if name == 'folds' else 1}, "
                                 f"got {getattr(self, name)}")


def pooled(model, latents: torch.Tensor, names: list[str], t: int, scheduler, seed: int = 0, device="cpu",
           batch_size: int = 128, progress: bool = False) -> dict[str, torch.Tensor]:
    """name -> (N, C) globally average-pooled features of x_t (noise fixed per image index)."""
    fcfg = FeatureConfig(input_mode="xt", timestep=int(t))
    maps = extract(model, latents, names, fcfg, seed, scheduler, device, desc=f"features t={t}", progress=progress,
                   batch_size=batch_size)
    return {n: m.float().mean(dim=(2, 3)) for n, m in maps.items()}


def analyze(model, scheduler, latents: torch.Tensor, labels: torch.Tensor, opts: AnalysisOptions | None = None,
            seed: int = 0, device="cpu", progress: bool = True) -> dict:
    """The probe grid, the zero-shot accuracy per t and the recommended (layers, t); JSON-able."""
    opts = opts or AnalysisOptions()
    opts.check(len(scheduler.alphas_cumprod))
    ts = [int(t) for t in opts.timesteps]
    y_all = labels.numpy()
    idx = torch.as_tensor(stratified_subsample(y_all, opts.images, [seed, 11]))
    z, y = latents[idx], y_all[idx.numpy()]
    names = list(model.feature_names)
    grid = {n: {} for n in names}
    for t in tqdm(ts, desc="analysis: probes", disable=not progress):
        feats = pooled(model, z, names, t, scheduler, seed, device)
        for n in names:
            grid[n][str(t)] = probe_score(feats[n].numpy(), y, opts.folds, seed)
    zidx = torch.as_tensor(stratified_subsample(y_all, opts.zs_images, [seed, 12]))
    zs = {}
    for t in tqdm(ts, desc="analysis: zero-shot per t", disable=not progress):
        one = ZeroShotOptions(trials=opts.zs_trials, timesteps=[t])
        res = classify_zero_shot(model, scheduler, latents[zidx], one, seed, device, progress=False)
        zs[str(t)] = float((res.pred == labels[zidx]).float().mean())
    best_layer, best_t = max(((n, t) for n in names for t in ts), key=lambda nt: grid[nt[0]][str(nt[1])])
    top = sorted(names, key=lambda n: -grid[n][str(best_t)])[:opts.top_layers]
    layers = [n for n in names if n in top]
    return {
        "timesteps": ts, "layers": names, "probe_balanced_accuracy": grid, "zero_shot_accuracy": zs,
        "n_probe_images": len(idx), "n_zero_shot_images": len(zidx), "folds": opts.folds,
        "best": {"layer": best_layer, "timestep": best_t, "balanced_accuracy": grid[best_layer][str(best_t)]},
        "recommended": {"input_mode": "xt", "timestep": best_t, "layers": layers},
        "feature_overrides": ["features.input_mode=xt", f"features.timestep={best_t}",
                              "features.layers=[" + ",".join(layers) + "]"],
    }


def plot_analysis(result: dict, path: str | Path) -> Path:
    """Heat map (layer x t) of the probes' balanced accuracy, plus zero-shot accuracy per t."""
    plt = pyplot()

    ts, names = result["timesteps"], result["layers"]
    m = np.array([[result["probe_balanced_accuracy"][n][str(t)] for t in ts] for n in names])
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 1.5 + 0.8 * len(ts)), 1.6 + 0.4 * len(names) + 1.8),
                                  gridspec_kw={"height_ratios": [max(len(names), 1), 3]})
    im = ax.imshow(m, cmap="viridis", aspect="auto", vmin=min(0.5, m.min()), vmax=max(m.max(), 0.5 + 1e-6))
    ax.set_xticks(range(len(ts)), [str(t) for t in ts])
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(ts)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] < m.mean() else "black")
    rec = result["recommended"]
    j = ts.index(rec["timestep"])
    for n in rec["layers"]:
        ax.add_patch(plt.Rectangle((j - 0.5, names.index(n) - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_xlabel("timestep t")
    ax.set_title("linear probe balanced accuracy (CV on train); red = recommended", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax2.plot(range(len(ts)), [result["zero_shot_accuracy"][str(t)] for t in ts], "o-")
    ax2.set_xticks(range(len(ts)), [str(t) for t in ts])
    ax2.set_xlabel("timestep t")
    ax2.set_ylabel("zero-shot acc")
    ax2.set_title("zero-shot accuracy using this single t", fontsize=9)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out
