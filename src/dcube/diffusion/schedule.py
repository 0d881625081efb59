"""The DDPM noise schedule (MONAI's schedulers) built from the config."""

from __future__ import annotations

from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from dcube.config import DiffusionConfig


def ddpm_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(cfg.num_train_timesteps, schedule="linear_beta",
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end)


def ddim_scheduler(cfg: DiffusionConfig, steps: int) -> DDIMScheduler:
    s = DDIMScheduler(cfg.num_train_timesteps, schedule="linear_beta",
                      beta_start=cfg.beta_start, beta_end=cfg.beta_end)
    s.set_timesteps(steps)
    return s
