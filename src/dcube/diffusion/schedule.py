"""The DDPM noise schedule (MONAI's schedulers) built from the config."""

from __future__ import annotations

from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from dcube.config import DiffusionConfig

BETA_START, BETA_END = 1e-4, 0.02  # the linear beta schedule of DDPM and of both papers


def ddpm_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(cfg.num_train_timesteps, schedule="linear_beta", beta_start=BETA_START, beta_end=BETA_END)


def ddim_scheduler(cfg: DiffusionConfig, steps: int) -> DDIMScheduler:
    s = DDIMScheduler(cfg.num_train_timesteps, schedule="linear_beta", beta_start=BETA_START, beta_end=BETA_END)
    s.set_timesteps(steps)
    return s
