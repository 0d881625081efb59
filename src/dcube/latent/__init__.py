"""Latent diffusion for chest X-rays (the ISBI 2025 method): autoencoder, latent step 1,
zero-shot classification (the scorer lives in dcube.diffusion.zeroshot, shared with D-Cube's
cycle loss), error maps, timestep x layer analysis, light heads.

A stage after ``dcube.diffusion`` and ``dcube.features`` (it imports only those, ``dcube.data``,
``dcube.evaluate``, ``dcube.config`` and ``dcube.utils``). See docs/latent.md.
"""

from dcube.diffusion.zeroshot import ZeroShotResult, classify_zero_shot, make_trials
from dcube.latent.autoencoder import LatentCodec, load_codec, train_autoencoder

__all__ = ["LatentCodec", "ZeroShotResult", "classify_zero_shot", "load_codec", "make_trials", "train_autoencoder"]
