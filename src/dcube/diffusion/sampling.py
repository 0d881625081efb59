"""Class-conditional sampling (DDIM through MONAI's scheduler) and the per-class grid."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dcube.config import DiffusionConfig
from dcube.diffusion.guidance import guided_eps
from dcube.diffusion.schedule import ddim_scheduler, ddpm_scheduler
from dcube.utils import dist
from dcube.utils.plotting import save_image_rows


def save_grid(images: torch.Tensor, labels: torch.Tensor, class_names: list[str], path: str | Path) -> Path:
    """One row per class of generated images, saved as PNG."""
    per = max(int((labels == c).sum()) for c in range(len(class_names)))
    return save_image_rows([(name, images[labels == c]) for c, name in enumerate(class_names)], path, per,
                           inches=1.2)


# --------------------------------------------------------------------------- generation
SAMPLERS = ("ddpm", "ddim")


def _check_labels(model, labels: torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"labels: expected int64 class ids of shape (N,), got {labels.dtype} {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise ValueError(f"labels: class ids must lie in [0, {model.num_classes}), got "
                         f"{labels.min().item()}..{labels.max().item()}")
    return labels.long()


@torch.no_grad()
def sample_images(model, cfg: DiffusionConfig, labels: torch.Tensor, *, sampler: str = "ddim",
                  steps: int | None = None, guidance: float = 0.0, seed: int = 0, batch_size: int = 256,
                  device: torch.device | str = "cpu", progress: bool = True,
                  desc: str = "sampling") -> torch.Tensor:
    """One image per class id in `labels`: float32 (N, C, H, W) in [-1, 1], on the CPU.

    ``sampler="ddpm"``: ancestral sampling over all ``cfg.num_train_timesteps`` steps (1000).
    ``sampler="ddim"``: DDIM (eta = 0) with `steps` steps (default 50; 25-100 is typical).
    `guidance`: classifier-free guidance scale w (0 = the plain conditional model; w > 0
    needs a model trained with ``class_dropout > 0``). Deterministic for a seed: the starting
    noise of every image comes from one generator seeded by `seed` (independent of
    `batch_size`; DDPM's per-step noise is seeded by (seed, batch index)).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: {sampler!r} is not one of {list(SAMPLERS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if guidance < 0:
        raise ValueError(f"guidance: must be >= 0, got {guidance}")
    labels = _check_labels(model, labels)
    if sampler == "ddpm":
        if steps not in (None, cfg.num_train_timesteps):
            raise ValueError(f"steps: DDPM ancestral sampling runs all {cfg.num_train_timesteps} steps; "
                             f"use sampler='ddim' for {steps} steps")
        sched = ddpm_scheduler(cfg)
        sched.set_timesteps(cfg.num_train_timesteps)
    else:
        steps = min(50, cfg.num_train_timesteps) if steps is None else steps
        if not 1 <= steps <= cfg.num_train_timesteps:
            raise ValueError(f"steps: must lie in [1, {cfg.num_train_timesteps}], got {steps}")
        sched = ddim_scheduler(cfg, steps)
    model.eval()
    shape = (model.in_channels, model.image_size, model.image_size)
    noise = torch.randn((len(labels), *shape), generator=torch.Generator().manual_seed(seed))
    # several processes: every world-th batch here, all gathered in order (the same images)
    batches = range(dist.rank(), math.ceil(len(labels) / batch_size), dist.world_size())
    bar = tqdm(total=len(batches) * len(sched.timesteps), desc=desc, unit="step",
               disable=not (progress and dist.is_main()))
    out = []
    for b in batches:
        s = b * batch_size
        x, y = noise[s:s + batch_size].to(device), labels[s:s + batch_size].to(device)
        gen = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + b)
        for t in sched.timesteps:
            tt = torch.full((len(y),), int(t), device=x.device, dtype=torch.long)
            eps = guided_eps(model, x, tt, y, guidance)
            x, _ = sched.step(eps, int(t), x, generator=gen) if sampler == "ddpm" else sched.step(eps, int(t), x)
            bar.update(1)
        out.append(x.clamp(-1, 1).cpu())
    bar.close()
    return dist.gather_ordered(torch.cat(out) if out else torch.empty((0, *shape)), len(labels), block=batch_size)

