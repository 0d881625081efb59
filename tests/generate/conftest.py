"""Tiny step-1 checkpoints and image folders for the generation tests (8 px, micro models)."""

import numpy as np
import pytest
import torch
from PIL import Image

from dcube.config import DiffusionConfig
from dcube.diffusion.trainer import train_diffusion

MICRO = dict(backbone="unet", preset="micro", epochs=1, max_steps=2, batch_size=8, checkpoint_every=100,
             sample_grid=False, num_train_timesteps=20)


def toy_images(counts, size=8, seed=0):
    """Class c: a bright square at a class-specific place, plus noise; (N, 1, size, size) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = torch.rand(len(labels), 1, size, size, generator=g) * 0.2 - 0.9
    for i, c in enumerate(labels.tolist()):
        x[i, :, c * 2:c * 2 + 4, c * 2:c * 2 + 4] = 0.8
    return x, labels


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A 2-step micro UNet trained with class_dropout (8 px, 2 classes, 20 timesteps)."""
    images, labels = toy_images([10, 6])
    torch.manual_seed(0)
    return train_diffusion(DiffusionConfig(**MICRO, class_dropout=0.5), images, labels, 2,
                           tmp_path_factory.mktemp("step1"), seed=0)


def write_folder(root, counts, size=8):
    """An image-folder dataset root/<class>/*.png with `counts` images per class."""
    rng = np.random.default_rng(0)
    for c, n in enumerate(counts):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(d / f"{i}.png")
    return root
