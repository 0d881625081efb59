"""A picture per class: real training images next to generated ones."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from dcube.utils.plotting import save_image_rows


def save_real_vs_generated(real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor,
                           fake_labels: torch.Tensor, class_names: Sequence[str], path: str | Path,
                           per: int = 8) -> Path:
    """Two rows per class (real, then generated), `per` images each, saved as PNG."""
    return save_rows([("real", real, real_labels), ("generated", fake, fake_labels)], class_names, path, per)


def save_rows(sets: Sequence[tuple[str, torch.Tensor, torch.Tensor]], class_names: Sequence[str],
              path: str | Path, per: int = 8) -> Path:
    """One row per class and set (`(kind, images in [-1, 1], labels)`, e.g. real, then each sampler's),
    `per` images each, saved as PNG."""
    return save_image_rows([(f"{name}: {kind}", images[labels == c]) for c, name in enumerate(class_names)
                            for kind, images, labels in sets], path, per)
