"""Class-conditional sampling (DDIM through MONAI's scheduler) and the per-class grid."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from dcube.config import DiffusionConfig
from dcube.diffusion.schedule import ddim_scheduler


@torch.no_grad()
def sample(model, cfg: DiffusionConfig, labels: torch.Tensor, shape: tuple[int, int, int],
           steps: int = 50, seed: int = 0, device: torch.device | str = "cpu",
           progress: bool = True) -> torch.Tensor:
    """Draw one image per entry of `labels` (int64); returns (N, C, H, W) clipped to [-1, 1]."""
    model.eval()
    sched = ddim_scheduler(cfg, steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((len(labels), *shape), generator=gen).to(device)
    y = labels.to(device)
    for t in tqdm(sched.timesteps, desc="sampling", disable=not progress, leave=False):
        tt = torch.full((len(y),), int(t), device=device, dtype=torch.long)
        eps = model(x, tt, y)
        x, _ = sched.step(eps, int(t), x)
    return x.clamp(-1, 1).cpu()


def save_grid(images: torch.Tensor, labels: torch.Tensor, class_names: list[str], path: str | Path) -> Path:
    """One row per class of generated images, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcube.utils.io import atomic_write

    rows = len(class_names)
    per = max(int((labels == c).sum()) for c in range(rows))
    fig, axes = plt.subplots(rows, per, figsize=(1.2 * per, 1.3 * rows), squeeze=False)
    for c, name in enumerate(class_names):
        imgs = images[labels == c]
        for j in range(per):
            ax = axes[c][j]
            ax.axis("off")
            if j < len(imgs):
                img = (imgs[j].permute(1, 2, 0).numpy() + 1) / 2
                ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        axes[c][0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out
