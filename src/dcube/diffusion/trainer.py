"""Step 1: train the class-conditional denoiser (noise MSE + contrastive loss on the middle block).

Resumable and deterministic: the data order of epoch e comes from a generator seeded by
(seed, e) and the noise of step s from (seed, s), so a run interrupted and resumed from its
last checkpoint ends with the same weights as one that ran straight through.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dcube.config import DiffusionConfig
from dcube.diffusion import build_denoiser, contrastive_loss, pair_indices
from dcube.diffusion.guidance import drop_labels
from dcube.diffusion.schedule import ddpm_scheduler
from dcube.utils.io import load_checkpoint, save_checkpoint, write_json
from dcube.utils.runtime import EMA

LAST = "last.safetensors"
FINAL = "ema.safetensors"


def model_meta(cfg: DiffusionConfig, in_channels: int, image_size: int, num_classes: int) -> dict:
    return {"diffusion": vars(cfg).copy(), "in_channels": in_channels, "image_size": image_size,
            "num_classes": num_classes}


def load_denoiser(path: str | Path, device="cpu"):
    """Rebuild the frozen EMA denoiser from `ema.safetensors` (weights + JSON metadata)."""
    from dcube.utils.io import load_tensors

    _, meta = load_tensors(path)
    cfg = DiffusionConfig(**meta["diffusion"])
    model = build_denoiser(cfg, meta["in_channels"], meta["image_size"], meta["num_classes"])
    load_checkpoint(path, {"model": model})
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, cfg


class _MidFeatures:
    """Forward hook that keeps the middle block's output (for the contrastive loss)."""

    def __init__(self, model):
        self.model, self.out = model, None
        self.handle = model.feature_modules()[model.mid_name].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.out = self.model.to_map(self.model.mid_name, output)


def train_diffusion(cfg: DiffusionConfig, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    out_dir: str | Path, seed: int = 0, device: torch.device | str = "cpu",
                    class_names: list[str] | None = None, on_step=None) -> Path:
    """Train (or resume) step 1 on `images` in [-1, 1]; returns the path of the EMA weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, c, h, _ = images.shape
    model = build_denoiser(cfg, c, h, num_classes).to(device)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = ddpm_scheduler(cfg)
    meta = model_meta(cfg, c, h, num_classes)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    step, history = 0, []
    if (out_dir / LAST).exists():
        state = load_checkpoint(out_dir / LAST, {"model": model, "ema": ema.module, "opt": opt})
        step, history = state["step"], state["history"]
        print(f"[step 1] resuming from step {step}/{total} ({out_dir / LAST})")
    mid = _MidFeatures(model) if cfg.contrastive_weight > 0 else None

    def checkpoint():
        save_checkpoint(out_dir / LAST, {"model": model, "ema": ema.module, "opt": opt},
                        {**meta, "step": step, "history": history})

    bar = tqdm(total=total, initial=step, desc="step 1: diffusion", unit="step")
    t0 = time.time()
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        x, y = images[idx], labels[idx]
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        t = torch.randint(0, cfg.num_train_timesteps, (len(x),), generator=g)
        noise = torch.randn(x.shape, generator=g)
        cond = F.one_hot(y, num_classes).float()
        q = len(idx) // 4 if mid is not None else 0
        if q:
            # the first 2q slots: pairs (anchor x[:q], partner x[p]) sharing t and noise, denoised
            # under the uniform class condition the features are later extracted with (with the
            # true label the class embedding alone would satisfy the loss: it fell to 0 in 30 steps)
            p = pair_indices(y, g)[:q]
            x = torch.cat([x[:q], x[p], x[2 * q:]])
            y = torch.cat([y[:q], y[p], y[2 * q:]])
            uniform = torch.full((2 * q, num_classes), 1.0 / num_classes)
            cond = torch.cat([uniform, F.one_hot(y[2 * q:], num_classes).float()])
            t = torch.cat([t[:q], t[:q], t[2 * q:]])
            noise = torch.cat([noise[:q], noise[:q], noise[2 * q:]])
        if getattr(cfg, "class_dropout", 0.0) > 0:  # classifier-free guidance: learn the null class
            cond = drop_labels(cond, cfg.class_dropout, g, start=2 * q)
        x, y, t, noise, cond = x.to(device), y.to(device), t.to(device), noise.to(device), cond.to(device)
        model.train()
        eps = model(sched.add_noise(x, noise, t), t, cond)
        mse = F.mse_loss(eps, noise)
        loss, con = mse, torch.zeros(())
        if q:
            f = mid.out.flatten(1)
            con = contrastive_loss(f[:q], f[q:2 * q], y[:q] == y[q:2 * q], cfg.contrastive_margin)
            loss = mse + cfg.contrastive_weight * con
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step 1: loss became {loss.item()} at step {step}; lower diffusion.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mse, con = mse.detach(), con.detach()
        step += 1
        ema.update(model, step)
        history.append({"step": step, "mse": mse.item(), "contrastive": con.item()})
        bar.update(1)
        bar.set_postfix(mse=f"{float(mse):.4f}", con=f"{float(con):.3f}")
        if step % cfg.checkpoint_every == 0 or step == total:
            checkpoint()
        if on_step is not None:
            on_step(step)
    bar.close()
    if mid is not None:
        mid.handle.remove()
    elapsed = time.time() - t0
    save_checkpoint(out_dir / FINAL, {"model": ema.module}, {**meta, "step": step})
    write_json(out_dir / "history.json", {"steps": step, "seconds_this_session": elapsed, "history": history})
    if cfg.sample_grid and class_names:
        from dcube.diffusion.sampling import sample_images, save_grid

        per = 8
        lab = torch.arange(num_classes).repeat_interleave(per)
        imgs = sample_images(ema.module, cfg, lab, steps=cfg.sample_steps, seed=seed, device=device)
        save_grid(imgs, lab, class_names, out_dir / "samples.png")
    return out_dir / FINAL
