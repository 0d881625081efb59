"""Error maps: where in the image the class evidence of the zero-shot classifier lies.

For an image x (latent z) and the predicted class p and runner-up r, each trial (t, eps) gives
the denoiser's clean-latent estimate under either class,
``z0_c = (z_t - sqrt(1 - abar_t) eps_theta(z_t, t, c)) / sqrt(abar_t)``, which is decoded to an
image; its per-pixel squared error against x (mean over channels) is the class's error image.
The map is the mean over trials of ``err_r - err_p``: **positive (red) where the predicted class
reconstructs the image better**, i.e. the regions that argue for the prediction; negative (blue)
where the runner-up fits better. For a pixel-space model the codec is the identity.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dcube.latent.autoencoder import LatentCodec
from dcube.utils.io import atomic_write, safe_name
from dcube.utils.plotting import pyplot

# the trials of an error map: these timesteps, this many noise draws each (fixed: they are not a setting anyone tuned)
TIMESTEPS = (100, 250, 400)
NOISES = 2


@torch.no_grad()
def error_map(model, scheduler, codec: LatentCodec, image: torch.Tensor, classes: tuple[int, int],
              timesteps: list[int], noises: int = 2, seed: int = 0, device="cpu") -> torch.Tensor:
    """(H, W) float map: mean over trials of err(runner-up) - err(predicted); see module docs."""
    x = image[None].to(device)
    z = codec.encode(x)
    g = torch.Generator().manual_seed(seed * 7_919 + 29)
    total = torch.zeros(x.shape[-2:], device=device)
    count = 0
    pred, runner = classes
    ab = scheduler.alphas_cumprod.to(device)
    for t in timesteps:
        for _ in range(noises):
            eps = torch.randn(z.shape, generator=g).to(device)
            tt = torch.full((2,), int(t), dtype=torch.long, device=device)
            zt = scheduler.add_noise(z.expand(2, *z.shape[1:]), eps.expand(2, *z.shape[1:]), tt)
            out = model(zt, tt, torch.tensor([pred, runner], device=device))
            z0 = (zt - (1 - ab[t]).sqrt() * out) / ab[t].sqrt()
            err = (codec.decode(z0) - x).pow(2).mean(1)  # (2, H, W)
            total += err[1] - err[0]
            count += 1
    return (total / max(count, 1)).cpu()


def save_overlay(image: torch.Tensor, emap: torch.Tensor, path: str | Path, title: str = "",
                 smooth: float = 1.0, label: str = "err(runner-up) - err(pred)",
                 caption: str = "evidence for the prediction (red)", signed: bool = True) -> Path:
    """Image | image with the map as a diverging heat-map overlay (red = evidence for the
    predicted class), with a colour bar. PNG, written atomically. Also draws Grad-CAM maps
    (``dcube predict --heatmaps``: non-negative, so red only)."""
    plt = pyplot()
    from scipy.ndimage import gaussian_filter

    img = ((image.cpu().permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
    img = img[..., 0] if img.shape[-1] == 1 else img
    m = emap.numpy().astype(np.float64)
    if smooth > 0:
        m = gaussian_filter(m, smooth)
    lim = float(np.abs(m).max()) or 1.0
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.3))
    for ax in axes:
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
    im = axes[1].imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.55) if signed else \
        axes[1].imshow(m, cmap="inferno", vmin=0.0, vmax=lim, alpha=0.5)  # a non-negative map (Grad-CAM)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04, label=label)
    axes[0].set_title("image", fontsize=8)
    axes[1].set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out


def write_error_maps(model, scheduler, codec, images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor,
                     class_names: list[str], out_dir: str | Path, per_class: int = 2, timesteps=TIMESTEPS,
                     noises: int = NOISES, seed: int = 0, device="cpu", ids: list[str] | None = None) -> list[dict]:
    """Overlays for the first `per_class` images of each true class; returns what was written."""
    out_dir = Path(out_dir)
    written = []
    order = probs.argsort(1, descending=True)
    for c, name in enumerate(class_names):
        for i in torch.nonzero(labels == c).flatten()[:per_class].tolist():
            p, r = int(order[i, 0]), int(order[i, 1])
            emap = error_map(model, scheduler, codec, images[i], (p, r), list(timesteps), noises, seed, device)
            title = (f"true {name} | predicted {class_names[p]} (p={probs[i, p]:.2f}) "
                     f"vs runner-up {class_names[r]}")
            path = save_overlay(images[i], emap, out_dir / f"{safe_name(name, 'class')}_{i:05d}.png", title)
            written.append({"index": i, "id": ids[i] if ids else None, "true": name, "pred": class_names[p],
                            "runner_up": class_names[r], "path": str(path)})
    return written
