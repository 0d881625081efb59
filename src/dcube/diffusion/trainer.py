"""Step 1: train the class-conditional denoiser (noise MSE + contrastive loss on the middle block).

Resumable and deterministic: the data order of epoch e comes from a generator seeded by
(seed, e) and the noise of step s from (seed, s), so a run interrupted and resumed from its
last checkpoint ends with the same weights as one that ran straight through.

Several processes (``torchrun`` / ``accelerate launch``, :mod:`dcube.utils.dist`): every rank
draws the whole batch (order, t, noise, pairs, dropped labels) exactly as one process would and
runs its share of the rows; the losses are weighted so that the average of the ranks' gradients
(:func:`dcube.utils.dist.sync_gradients`) is the gradient of the whole batch. The step counter,
and so every checkpoint, is the same whatever the number of processes: a run saved by N
processes resumes with M (the model is saved unwrapped).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dcube.config import ComputeConfig, DiffusionConfig
from dcube.diffusion import build_denoiser, contrastive_loss, pair_indices
from dcube.diffusion.guidance import drop_labels
from dcube.diffusion.schedule import ddpm_scheduler
from dcube.utils import dist
from dcube.utils.compute import Precision, memory_format, training_module
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


def micro_batches(n: int, q: int, accum: int = 1) -> list[tuple[torch.Tensor | None, int]]:
    """This rank's micro-batches of a batch of `n` rows whose first 2q rows are q (anchor, partner)
    pairs (anchor i at row i, its partner at row q + i): ``[(rows, pairs), ...]``, each laid out
    like a batch (anchors, partners, the rest). A pair never straddles two ranks. One process
    without accumulation: ``[(None, q)]``, the whole batch as it is."""
    if dist.world_size() == 1 and accum == 1:
        return [(None, q)]
    anchors, rest = dist.shard_indices(q), 2 * q + dist.shard_indices(n - 2 * q)
    out = []
    for a, r in zip(anchors.tensor_split(accum), rest.tensor_split(accum)):
        if len(a) + len(r):
            out.append((torch.cat([a, q + a, r]), len(a)))
    return out


def train_diffusion(cfg: DiffusionConfig, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    out_dir: str | Path, seed: int = 0, device: torch.device | str = "cpu",
                    class_names: list[str] | None = None, on_step=None,
                    compute: ComputeConfig | None = None) -> Path:
    """Train (or resume) step 1 on `images` in [-1, 1]; returns the path of the EMA weights.

    `compute`: mixed precision, gradient accumulation (each rank's rows of a batch in
    ``grad_accum`` micro-batches: less memory, the same optimiser steps), torch.compile and
    channels-last; default all off."""
    compute = compute or ComputeConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, c, h, _ = images.shape
    model = build_denoiser(cfg, c, h, num_classes).to(device)
    dist.broadcast_module(model)  # replicas start from rank 0's initialisation
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = Precision(compute.mixed_precision, device)
    sched = ddpm_scheduler(cfg)
    meta = model_meta(cfg, c, h, num_classes)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    step, history = 0, []
    main = dist.is_main()
    if (out_dir / LAST).exists():
        state = load_checkpoint(out_dir / LAST, {"model": model, "ema": ema.module, "opt": opt})
        step, history = state["step"], state["history"]
        amp.load_state(state.get("amp"))
        if main:
            print(f"[step 1] resuming from step {step}/{total} ({out_dir / LAST})")
    mid = _MidFeatures(model) if cfg.contrastive_weight > 0 else None
    net = training_module(model, compute)

    def checkpoint():
        extra = {"amp": amp.state()} if amp.scaler is not None else {}
        save_checkpoint(out_dir / LAST, {"model": model, "ema": ema.module, "opt": opt},
                        {**meta, "step": step, "history": history, **extra})

    bar = tqdm(total=total, initial=step, desc="step 1: diffusion", unit="step", disable=not main)
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
        model.train()
        opt.zero_grad(set_to_none=True)
        logged = torch.zeros(2)  # this rank's share of the batch's mse and contrastive loss
        for rows, qr in micro_batches(len(x), q, compute.grad_accum):
            xb, yb, tb, nb, cb = (v if rows is None else v[rows] for v in (x, y, t, noise, cond))
            xb, yb, tb, nb, cb = xb.to(device), yb.to(device), tb.to(device), nb.to(device), cb.to(device)
            with amp.autocast():
                eps = net(memory_format(sched.add_noise(xb, nb, tb), compute), tb, cb)
            mse = F.mse_loss(eps.float(), nb) if amp.dtype is not None else F.mse_loss(eps, nb)
            loss, con = mse, torch.zeros(())
            if qr:
                f = mid.out.flatten(1)
                con = contrastive_loss(f[:qr], f[qr:2 * qr], yb[:qr] == yb[qr:2 * qr], cfg.contrastive_margin)
                loss = mse + cfg.contrastive_weight * con
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step 1: loss became {loss.item()} at step {step}; lower diffusion.lr")
            if rows is not None:  # weights: the ranks' average gradient is the whole batch's
                w_mse, w_con = len(rows) / len(x), (qr / q if q else 0.0)
                loss = (w_mse * mse + w_con * cfg.contrastive_weight * con) * dist.world_size()
                mse, con = mse * w_mse, con * w_con
            amp.backward(loss)
            logged += torch.stack([mse.detach().float().cpu(), con.detach().float().cpu()])
        dist.sync_gradients(model)
        amp.step(opt)
        mse, con = dist.all_sum(logged)
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
        imgs = sample_images(ema.module, cfg, lab, steps=cfg.sample_steps, seed=seed, device=device,
                             progress=main)
        save_grid(imgs, lab, class_names, out_dir / "samples.png")
    return out_dir / FINAL
