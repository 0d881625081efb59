"""A picture per class: real training images next to generated ones."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from dcube.utils.io import atomic_write
from dcube.utils.plotting import pyplot


def save_real_vs_generated(real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor,
                           fake_labels: torch.Tensor, class_names: Sequence[str], path: str | Path,
                           per: int = 8) -> Path:
    """Two rows per class (real, then generated), `per` images each, saved as PNG."""
    return save_rows([("real", real, real_labels), ("generated", fake, fake_labels)], class_names, path, per)


def save_rows(sets: Sequence[tuple[str, torch.Tensor, torch.Tensor]], class_names: Sequence[str],
              path: str | Path, per: int = 8) -> Path:
    """One row per class and set (`(kind, images in [-1, 1], labels)`, e.g. real, then each sampler's),
    `per` images each, saved as PNG."""
    plt = pyplot()

    rows = len(sets) * len(class_names)
    fig, axes = plt.subplots(rows, per, figsize=(1.1 * per, 1.25 * rows), squeeze=False)
    for c, name in enumerate(class_names):
        for r, (kind, images, labels) in enumerate(sets):
            imgs = images[labels == c]
            row = axes[len(sets) * c + r]
            for j, ax in enumerate(row):
                ax.axis("off")
                if j < len(imgs):
                    img = ((imgs[j].float().permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
                    ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            row[0].set_title(f"{name}: {kind}", fontsize=8, loc="left")
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out
