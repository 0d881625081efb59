"""The image autoencoder of latent diffusion: MONAI ``AutoencoderKL`` and the scaled-latent codec.

Trained here on the training images (L1 reconstruction + KL, no perceptual or adversarial loss:
nothing is downloaded), or loaded from a user-given safetensors file. Latents are the encoder
means multiplied by ``scale = 1 / std`` (computed on the training images), so the diffusion
model sees unit-variance inputs. :class:`LatentCodec` wraps encode/decode; with no autoencoder
it is the identity (a pixel-space step-1 model).

Files (``out_dir``): ``last.safetensors`` (resume), ``autoencoder.safetensors`` (weights + JSON
metadata: spec, scale, reconstruction metrics), ``history.json``, ``recon.json``, ``recon.png``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
from monai.networks.nets import AutoencoderKL
from torch import nn
from tqdm.auto import tqdm

from dcube.config import LatentConfig
from dcube.diffusion.sampling import save_grid
from dcube.utils import dist
from dcube.utils.engine import Engine
from dcube.utils.io import load_tensors, save_tensors, sha256_file, write_json

LAST = "last.safetensors"
FINAL = "autoencoder.safetensors"
KIND = "dcube-autoencoderkl"
# training settings no study changed (their keys left the config in dcube 1.0)
BATCH_SIZE = 16  # images per optimiser step
LR = 5e-4  # AdamW learning rate
KL_WEIGHT = 1e-6  # weight of the KL term beside the L1 reconstruction
CROP = 64  # random square crops (the network is fully convolutional); smaller images are used whole
CHECKPOINT_EVERY = 100  # optimiser steps between checkpoints
LATENT_CHANNELS = 4  # channels of the latent (Stable Diffusion's autoencoders have 4 too)


def ae_spec(cfg: LatentConfig, channels: int) -> dict:
    """AutoencoderKL keyword arguments from the config (attention off: cheap on a CPU; one residual block
    per level; GroupNorm with the largest group count up to 8 that divides every level's channels)."""
    chans = [int(c) for c in cfg.ae_channels]
    if not chans:
        raise ValueError("latent.ae_channels: must list at least one channel count")
    return dict(spatial_dims=2, in_channels=channels, out_channels=channels, channels=chans,
                latent_channels=LATENT_CHANNELS, num_res_blocks=1,
                attention_levels=[False] * len(chans), norm_num_groups=math.gcd(8, *chans),
                with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)


def build_autoencoder(spec: dict) -> AutoencoderKL:
    return AutoencoderKL(**spec)


def downsampling(spec: dict) -> int:
    return 2 ** (len(spec["channels"]) - 1)


class LatentCodec(nn.Module):
    """Images in [-1, 1] <-> scaled latents. ``autoencoder=None``: the identity (pixel space)."""

    def __init__(self, autoencoder: Optional[AutoencoderKL] = None, scale: float = 1.0, info: dict | None = None):
        super().__init__()
        self.autoencoder = autoencoder
        self.scale = float(scale)
        self.info = info or {}
        if autoencoder is not None:
            autoencoder.eval()
            for p in autoencoder.parameters():
                p.requires_grad_(False)

    @property
    def is_identity(self) -> bool:
        return self.autoencoder is None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic: the encoder mean, times `scale`."""
        if self.autoencoder is None:
            return x
        return self.autoencoder.encode(x)[0] * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images clipped to [-1, 1]."""
        if self.autoencoder is None:
            return z.clamp(-1, 1)
        return self.autoencoder.decode(z / self.scale).clamp(-1, 1)

    @torch.no_grad()
    def encode_all(self, images: torch.Tensor, batch_size: int = 64, device="cpu", desc: str = "encoding",
                   progress: bool = True) -> torch.Tensor:
        self.to(device)
        mine = dist.shard_indices(len(images), block=batch_size)  # several processes: every world-th batch
        one = dist.world_size() == 1
        out = [self.encode((images[s:s + batch_size] if one else images[mine[s:s + batch_size]]).to(device)).cpu()
               for s in tqdm(range(0, len(mine), batch_size), desc=desc, disable=not (progress and dist.is_main()),
                             leave=False)]
        if not out:  # a process without a batch: an empty block of the latents' shape
            out = [self.encode(images[:1].to(device)).cpu()[:0]]
        return dist.gather_ordered(torch.cat(out), len(images), block=batch_size)

    @torch.no_grad()
    def decode_all(self, z: torch.Tensor, batch_size: int = 64, device="cpu") -> torch.Tensor:
        self.to(device)
        return torch.cat([self.decode(z[s:s + batch_size].to(device)).cpu() for s in range(0, len(z), batch_size)])


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)), summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


def _crop(x: torch.Tensor, size: Optional[int], g: torch.Generator) -> torch.Tensor:
    if size is None or size >= x.shape[-1]:
        return x
    h, w = x.shape[-2:]
    i = torch.randint(0, h - size + 1, (len(x),), generator=g)
    j = torch.randint(0, w - size + 1, (len(x),), generator=g)
    return torch.stack([im[:, a:a + size, b:b + size] for im, a, b in zip(x, i.tolist(), j.tolist())])


@torch.no_grad()
def latent_scale(ae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64, device="cpu") -> float:
    """1 / std of the encoder means over `images` (the latents' unit-variance scale)."""
    codec = LatentCodec(ae, 1.0)
    z = codec.encode_all(images, batch_size, device, desc="latent scale")
    return float(1.0 / z.float().std().clamp_min(1e-8))


@torch.no_grad()
def reconstruction_metrics(codec: LatentCodec, images: torch.Tensor, batch_size: int = 64, device="cpu") -> dict:
    """PSNR and SSIM (MONAI metrics, images mapped to [0, 1]) of encode -> decode."""
    from monai.metrics import PSNRMetric, SSIMMetric

    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=2, data_range=1.0)
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size].to(device)
        r = codec.decode(codec.encode(x))
        a, b = (r + 1) / 2, (x + 1) / 2
        psnr(a, b)
        ssim(a, b)
    return {"psnr": float(psnr.aggregate().item()), "ssim": float(ssim.aggregate().item()), "n": len(images)}


def train_autoencoder(cfg: LatentConfig, images: torch.Tensor, out_dir: str | Path, seed: int = 0,
                      device="cpu", heldout: Optional[torch.Tensor] = None, on_step=None, batch_size: int = BATCH_SIZE,
                      crop: Optional[int] = CROP, checkpoint_every: int = CHECKPOINT_EVERY,
                      max_steps: Optional[int] = None) -> Path:
    """Train (or resume) the AutoencoderKL on `images` in [-1, 1]; returns the final weights' path.
    `crop`: random square crops of this size (None: whole images); `max_steps`: at most this many steps.

    Deterministic and resumable like step 1: epoch order from (seed, epoch), crops and the
    reparameterisation noise from (seed, step). `heldout` images give the PSNR/SSIM report.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, c, h, _ = images.shape
    spec = ae_spec(cfg, c)
    if h % downsampling(spec):
        raise ValueError(f"data.image_size={h} is not divisible by the autoencoder's downsampling "
                         f"{downsampling(spec)} (latent.ae_channels has {len(spec['channels'])} levels)")
    if crop is not None and crop < h and crop % downsampling(spec):
        raise ValueError(f"crop={crop} must be divisible by the autoencoder's downsampling {downsampling(spec)}")
    ae = build_autoencoder(spec).to(device)
    dist.broadcast_module(ae)
    engine = Engine(ae, torch.optim.AdamW(ae.parameters(), lr=LR), last=out_dir / LAST)
    per_epoch = math.ceil(n / batch_size)
    total = cfg.ae_epochs * per_epoch if max_steps is None else min(cfg.ae_epochs * per_epoch, max_steps)
    if engine.resume() and dist.is_main():
        print(f"[autoencoder] resuming from step {engine.steps}/{total} ({out_dir / LAST})")
    bar = tqdm(total=total, initial=engine.steps, desc="autoencoder", unit="step", disable=not dist.is_main())
    t0 = time.time()
    while engine.steps < total:
        step = engine.steps
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x = _crop(images[order[k * batch_size:(k + 1) * batch_size]], crop, g)
        nb, rows = len(x), (None if dist.world_size() == 1 else dist.shard_indices(len(x)))
        x = (x if rows is None else x[rows]).to(device)  # several processes: this rank's rows of the batch
        ae.train()
        mu, sigma = ae.encode(x)
        noise = torch.randn((nb, *mu.shape[1:]), generator=g)  # drawn for the whole batch
        z = mu + sigma * (noise if rows is None else noise[rows]).to(device)
        rec = (ae.decode(z) - x).abs().mean()
        kl = kl_loss(mu, sigma)
        loss = rec + KL_WEIGHT * kl
        if not torch.isfinite(loss):
            raise FloatingPointError(f"autoencoder: loss became {loss.item()} at step {step}; check the images (NaN or extreme values?)")
        if rows is not None:  # the ranks' average gradient is the whole batch's
            rec, kl = rec * (len(rows) / nb), kl * (len(rows) / nb)
            loss = (rec + KL_WEIGHT * kl) * dist.world_size()
        with engine.step():
            engine.backward(loss)
        rec, kl = dist.all_sum(torch.stack([rec.detach(), kl.detach()]).cpu()) if rows is not None else (rec, kl)
        engine.history.append({"step": engine.steps, "l1": rec.item(), "kl": kl.item()})
        bar.update(1)
        bar.set_postfix(l1=f"{rec.item():.4f}")
        if engine.steps % checkpoint_every == 0 or engine.steps == total:
            engine.save(spec=spec)
        if on_step is not None:
            on_step(engine.steps)
    bar.close()
    ae.eval()
    scale = latent_scale(ae, images, device=device)
    recon = {}
    if heldout is not None and len(heldout):
        recon = reconstruction_metrics(LatentCodec(ae, scale), heldout, device=device)
        save_recon_grid(LatentCodec(ae, scale), heldout[:8], out_dir / "recon.png", device)
    meta = {"kind": KIND, "spec": spec, "scale": scale, "image_size": h, "steps": engine.steps, "recon": recon}
    write_json(out_dir / "recon.json", recon)
    write_json(out_dir / "history.json", {"steps": engine.steps, "seconds_this_session": time.time() - t0,
                                                "history": engine.history})
    return save_tensors(out_dir / FINAL, ae.state_dict(), meta)


def import_autoencoder(cfg: LatentConfig, path: str | Path, images: torch.Tensor, out_dir: str | Path,
                       device="cpu", heldout: Optional[torch.Tensor] = None) -> Path:
    """Use a user-given safetensors AutoencoderKL: written into `out_dir` with its scale and metrics.

    A file written by dcube carries its spec; any other is built from ``latent.ae_channels`` and
    its 4 latent channels.
    """
    path = Path(path)
    tensors, meta = load_tensors(path)
    spec = meta.get("spec") or ae_spec(cfg, images.shape[1])
    ae = build_autoencoder(spec)
    missing, unexpected = ae.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"latent.autoencoder: {path} does not match the AutoencoderKL built from "
                         f"latent.ae_channels (missing keys {missing[:5]}, unexpected keys {unexpected[:5]})")
    ae.to(device).eval()
    scale = float(meta.get("scale") or latent_scale(ae, images, device=device))
    recon = reconstruction_metrics(LatentCodec(ae, scale), heldout, device=device) if heldout is not None else {}
    out = {"kind": KIND, "spec": spec, "scale": scale, "image_size": images.shape[-1], "recon": recon,
           "source": str(path), "source_sha256": sha256_file(path)}
    write_json(Path(out_dir) / "recon.json", recon)
    return save_tensors(Path(out_dir) / FINAL, ae.state_dict(), out)


def load_codec(path: str | Path, device="cpu") -> LatentCodec:
    """The frozen codec from an ``autoencoder.safetensors`` written by dcube."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != KIND:
        raise ValueError(f"{path}: not a dcube autoencoder file (no spec/scale metadata); "
                         "import it with 'dcube train-autoencoder' and latent.autoencoder=PATH")
    ae = build_autoencoder(meta["spec"])
    ae.load_state_dict(tensors)
    codec = LatentCodec(ae.to(device), meta["scale"], {**meta, "path": str(path)})
    return codec


def save_recon_grid(codec: LatentCodec, images: torch.Tensor, path: str | Path, device="cpu") -> Path:
    """Two rows: originals and their reconstructions."""
    with torch.no_grad():
        rec = codec.decode_all(codec.encode_all(images, device=device, progress=False), device=device)
    labels = torch.cat([torch.zeros(len(images)), torch.ones(len(images))]).long()
    return save_grid(torch.cat([images.cpu(), rec]), labels, ["original", "reconstruction"], path)
