"""Latent diffusion: the step-1 trainer run on scaled autoencoder latents; sampling decodes.

``train_latent_diffusion`` encodes nothing itself: it takes the latents (N, c, h, w) and calls
:func:`dcube.diffusion.trainer.train_diffusion` (either backbone, class-conditional, with the
null class when ``diffusion.class_dropout`` exists and is > 0). Next to the model's
``ema.safetensors`` it writes ``latent.json`` naming the autoencoder file (and its sha256) the
latents came from; :func:`load_model` finds the codec through it (no ``latent.json``: a pixel-space
model and the identity codec).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dcube.config import DiffusionConfig
from dcube.diffusion.sampling import sample_images, save_grid
from dcube.diffusion.trainer import GRID_STEPS, load_denoiser, train_diffusion
from dcube.latent.autoencoder import LatentCodec, load_codec
from dcube.utils.io import read_json, sha256_file, write_json

LATENT_JSON = "latent.json"


def train_latent_diffusion(cfg: DiffusionConfig, codec: LatentCodec, latents: torch.Tensor, labels: torch.Tensor,
                           num_classes: int, out_dir: str | Path, seed: int = 0, device="cpu",
                           class_names: list[str] | None = None) -> Path:
    """Train (or resume) the class-conditional denoiser on `latents`; returns ``ema.safetensors``.

    Pure class-conditional training, as the ISBI method has it: the zero-shot classifier compares
    class-conditional likelihoods, so no row is spent on contrastive pairs under the uniform condition
    (``diffusion.contrastive_weight`` is ignored here)."""
    out_dir = Path(out_dir)
    if cfg.contrastive_weight:
        cfg = dataclasses.replace(cfg, contrastive_weight=0.0)
    path = train_diffusion(cfg, latents, labels, num_classes, out_dir, seed=seed, device=device, class_names=None)
    ae_path = codec.info.get("path")
    write_json(out_dir / LATENT_JSON, {
        "autoencoder": ae_path, "autoencoder_sha256": sha256_file(ae_path) if ae_path else None,
        "scale": codec.scale, "latent_shape": list(latents.shape[1:]),
        "latent_std": float(latents.std()), "latent_mean": float(latents.mean())})
    if cfg.sample_grid and class_names:
        save_samples(*load_model(path, device)[:3], class_names, out_dir / "samples.png",
                     min(GRID_STEPS, cfg.num_train_timesteps), seed, device)
    return path


def load_model(path: str | Path, device="cpu"):
    """(frozen denoiser, its DiffusionConfig, codec) for a step-1 ``ema.safetensors``."""
    path = Path(path)
    model, dcfg = load_denoiser(path, device)
    info_path = path.parent / LATENT_JSON
    if not info_path.exists():
        return model, dcfg, LatentCodec(None)
    info = read_json(info_path)
    ae_path = Path(info["autoencoder"])
    if not ae_path.exists():
        raise FileNotFoundError(f"{info_path}: its autoencoder file {ae_path} is missing")
    if info.get("autoencoder_sha256") and sha256_file(ae_path) != info["autoencoder_sha256"]:
        raise ValueError(f"{ae_path} changed since the latent model {path} was trained on it ({info_path})")
    return model, dcfg, load_codec(ae_path, device)


@torch.no_grad()
def sample_decoded(model, dcfg, codec: LatentCodec, labels: torch.Tensor, steps: int = 50, seed: int = 0,
                   device="cpu") -> torch.Tensor:
    """Class-conditional DDIM samples in latent space, decoded to images in [-1, 1]."""
    z = sample_images(model, dcfg, labels, steps=steps, seed=seed, device=device, progress=False)
    return codec.decode_all(z, device=device)


def save_samples(model, dcfg, codec, class_names, path, steps=50, seed=0, device="cpu", per_class: int = 8):
    labels = torch.arange(len(class_names)).repeat_interleave(per_class)
    return save_grid(sample_decoded(model, dcfg, codec, labels, steps, seed, device), labels, class_names, path)
