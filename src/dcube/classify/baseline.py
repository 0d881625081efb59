"""A plain supervised CNN (MONAI ResNet-18, EfficientNet-Lite0, ...) trained on images, optionally
with synthetic training images (the baseline of the rebalancing experiment), or semi-supervised with
FixMatch on the bundle's unlabelled images (Sohn et al. 2020: a pseudo-label from a weakly augmented view,
kept when its confidence reaches a threshold, trains the strongly augmented view; ``fixmatch: true``).

Adam, a fixed number of epochs, the best epoch chosen on the VALIDATION split (``score_fn``,
e.g. AUC) and its weights saved; an optional EMA of the weights is what gets validated.
Synthetic images enter only through :func:`dcube.generate.augment_train` (the training split);
val and test are checked to hold real images only. Metrics are computed by the caller
(``dcube.evaluate``), so this stage does not import a later one.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dcube.classify.bn import recalibrate_bn
from dcube.classify.subfeatures import PLAIN_NAMES, build_plain_classifier
from dcube.data import DataBundle
from dcube.generate import SyntheticSet, assert_real, augment_train
from dcube.utils.engine import Engine
from dcube.utils.io import load_tensors, save_checkpoint, write_json
from dcube.utils.runtime import EMA, epoch_batches, passes_for

LAST, BEST = "last.safetensors", "best.safetensors"


@dataclass
class BaselineConfig:
    model: str = "resnet18"  # resnet18 | resnet50 | efficientnet-lite0 (build_plain_classifier)
    epochs: int = 20
    min_steps: int = 0  # at least this many optimiser steps (repeated passes per epoch on a small training set)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_milestones: tuple = ()  # fractions of `epochs` where the LR is multiplied by lr_gamma
    lr_gamma: float = 0.1
    ema_decay: float = 0.0  # 0 = no EMA; else the EMA weights are validated and saved
    bn_recalibration: int = 1024  # training images that re-estimate BN statistics before each validation (0 = off)
    synthetic_ratio: Optional[float] = None  # at most ratio * len(train) synthetic images; None = all
    fixmatch: bool = False  # semi-supervised on bundle.unlabelled (FixMatch); labelled images get the weak view
    unlabelled_ratio: int = 7  # FixMatch's mu: unlabelled images per labelled one in a step
    threshold: float = 0.95  # FixMatch's tau: the weak view's confidence a pseudo-label needs
    lambda_u: float = 1.0  # weight of the unlabelled loss

    def __post_init__(self):
        if self.model not in PLAIN_NAMES:
            raise ValueError(f"baseline.model: {self.model!r} is not one of {list(PLAIN_NAMES)}")
        for k in ("epochs", "batch_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"baseline.{k}: must be >= 1, got {getattr(self, k)}")
        if self.min_steps < 0:
            raise ValueError(f"baseline.min_steps: must be >= 0, got {self.min_steps}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"baseline.ema_decay: must lie in [0, 1), got {self.ema_decay}")
        if not 0 < self.threshold <= 1 or self.unlabelled_ratio < 1 or self.lambda_u < 0:
            raise ValueError(f"baseline FixMatch: threshold in (0, 1], unlabelled_ratio >= 1, lambda_u >= 0; got "
                             f"{self.threshold}, {self.unlabelled_ratio}, {self.lambda_u}")
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ValueError(f"baseline.lr_milestones: fractions in (0, 1), got {self.lr_milestones}")

    def passes_for(self, n: int) -> int:
        """Passes over `n` training images per epoch (more than one to reach `min_steps`)."""
        return passes_for(self.epochs, self.min_steps, n, self.batch_size)

    def milestone_epochs(self) -> list[int]:
        """Epochs (0-based) after which the LR drops: MedMNIST's 50%/75% of 100 -> [50, 75]."""
        return sorted({int(round(m * self.epochs)) for m in self.lr_milestones})


# The MedMNIST v2 training protocol (Adam 1e-3, batch 128, 100 epochs, LR x0.1 at 50% and 75%).
MEDMNIST_PROTOCOL = dict(epochs=100, batch_size=128, lr=1e-3, lr_milestones=(0.5, 0.75), lr_gamma=0.1)


def fixmatch_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor, threshold: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's unlabelled loss: the weak view's argmax is the pseudo-label (no gradient through it); the
    strong view's cross-entropy to it counts only where the weak view's confidence reaches `threshold`,
    averaged over ALL unlabelled images (masked ones contribute 0). -> (loss, mask)."""
    probs = logits_weak.detach().softmax(dim=1)
    conf, pseudo = probs.max(dim=1)
    mask = (conf >= threshold).float()
    return (F.cross_entropy(logits_strong, pseudo, reduction="none") * mask).mean(), mask


def weak_view(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a translation of up to 1/8 of the side (reflect-padded): FixMatch's weak
    augmentation, batched (MONAI's array transforms work image by image)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    p = max(1, h // 8)
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    dy, dx = torch.randint(0, 2 * p + 1, (2, n), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def strong_view(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The weak view plus random contrast, brightness, Gaussian noise and a cutout square of 1/2 the side:
    a RandAugment-like strong augmentation for grey-level medical images (images stay in [-1, 1])."""
    x = weak_view(x, g)
    n, _, h, w = x.shape
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.8
    bright = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.4
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + bright + 0.05 * torch.randn(x.shape, generator=g)
    s = max(1, h // 2)
    cy, cx = torch.randint(0, h - s + 1, (n,), generator=g), torch.randint(0, w - s + 1, (n,), generator=g)
    keep = torch.ones_like(x)
    for i in range(n):
        keep[i, :, cy[i]:cy[i] + s, cx[i]:cx[i] + s] = 0
    return (x * keep).clamp(-1, 1)


@torch.no_grad()
def predict_probs(model, images: torch.Tensor, batch_size: int = 256, device="cpu") -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[s:s + batch_size].to(device)).softmax(1).cpu()
                      for s in range(0, len(images), batch_size)])


def train_baseline(cfg: BaselineConfig, bundle: DataBundle, out_dir: str | Path,
                   score_fn: Callable[[torch.Tensor, torch.Tensor], float], seed: int = 0,
                   synthetic: SyntheticSet | None = None, device="cpu", progress: bool = True) -> dict:
    """Train on ``bundle.train`` (+ `synthetic`), select on ``bundle.val``, predict ``bundle.test``.

    `score_fn(y_true, probs)` -> validation score, higher is better. Returns a dict with the
    best model (``model``), ``best_epoch``, ``history``, ``val_probs``, ``test_probs`` and
    the number of real / synthetic training images; writes best.safetensors and history.json.
    Every epoch ends with an atomic ``last.safetensors`` (model, optimiser, EMA, best weights,
    history); calling again with the same arguments resumes from it and gives the same result.
    """
    out_dir = Path(out_dir)
    assert_real(bundle.val, "val"), assert_real(bundle.test, "test")
    pool = bundle.unlabelled if cfg.fixmatch else None
    if cfg.fixmatch and (pool is None or not len(pool)):
        raise ValueError("baseline.fixmatch: needs unlabelled images (data.unlabelled or data.unlabelled_rest)")
    train = augment_train(bundle, synthetic, cfg.synthetic_ratio, seed) if synthetic is not None else bundle.train
    n_real = len(bundle.train)
    c, h = train.images.shape[1], train.images.shape[2]
    torch.manual_seed(seed)
    model = build_plain_classifier(cfg.model, c, bundle.num_classes, h).to(device)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    judged = ema.module if ema is not None else model
    best_model = copy.deepcopy(judged)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, cfg.milestone_epochs(), cfg.lr_gamma)
    n = len(train)
    passes = cfg.passes_for(n)
    steps_per_epoch = -(-n // cfg.batch_size) * passes
    engine = Engine(model, opt, ema=ema, last=out_dir / LAST,
                    modules={"model": model, "opt": opt, "best": best_model, **({"ema": ema.module} if ema else {})})
    state = {"epoch": 0, "best": -float("inf"), "best_epoch": 0, "history": [], "seconds": 0.0}
    if (out_dir / LAST).exists():
        meta = load_tensors(out_dir / LAST)[1]
        if meta.get("config") != json.loads(json.dumps(asdict(cfg))) or meta.get("seed") != seed \
                or meta.get("n_train") != n:
            raise RuntimeError(f"{out_dir / LAST} was written by another configuration/seed/training set; "
                               f"use a new output directory")
        state = engine.resume()["state"]
        engine.steps = state["epoch"] * steps_per_epoch
        sched.last_epoch = state["epoch"]  # the optimiser state restored the current LR already
        print(f"[baseline] resuming {cfg.model} at epoch {state['epoch'] + 1}/{cfg.epochs} ({out_dir})")
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=state["epoch"] * steps_per_epoch,
               desc=f"baseline {cfg.model}", unit="step", disable=not progress)
    for epoch in range(state["epoch"], cfg.epochs):
        t0 = time.time()
        torch.manual_seed(seed * 7919 + epoch)  # dropout draws: the same whether resumed or not
        model.train()
        losses, masked = [], []
        for b, idx in enumerate(epoch_batches(n, cfg.batch_size, seed, epoch, passes)):
            x = train.images[idx]
            if pool is not None:  # FixMatch: the step's own generator, so a resumed run draws the same
                g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * steps_per_epoch + b)
                x = weak_view(x, g)
            loss = F.cross_entropy(model(x.to(device)), train.labels[idx].to(device))
            if pool is not None:
                u = pool[torch.randint(0, len(pool), (cfg.unlabelled_ratio * len(idx),), generator=g)]
                u = torch.as_tensor(u)
                with torch.no_grad():  # the pseudo-labels take no gradient (BN statistics still update)
                    logits_weak = model(weak_view(u, g).to(device))
                lu, mask = fixmatch_loss(logits_weak, model(strong_view(u, g).to(device)), cfg.threshold)
                loss = loss + cfg.lambda_u * lu
                masked.append(float(mask.mean()))
            with engine.step():  # the EMA follows at step epoch * steps_per_epoch + b + 1
                engine.backward(loss)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        sched.step()
        if cfg.bn_recalibration > 0:
            rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cfg.bn_recalibration]
            recalibrate_bn(judged, [(train.images[rows[s:s + cfg.batch_size]].to(device),)
                                    for s in range(0, len(rows), cfg.batch_size)])
        score = float(score_fn(bundle.val.labels, predict_probs(judged, bundle.val.images, device=device)))
        state["history"].append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "val_score": score,
                                 "lr": opt.param_groups[0]["lr"],
                                 **({"pseudo_label_share": sum(masked) / len(masked)} if masked else {})})
        if score > state["best"]:
            state.update(best=score, best_epoch=epoch + 1)
            best_model.load_state_dict(judged.state_dict())
        state["epoch"] = epoch + 1
        state["seconds"] += time.time() - t0
        engine.save(config=asdict(cfg), seed=seed, n_train=n, state=state)
    bar.close()
    save_checkpoint(out_dir / BEST, {"model": best_model}, {"config": asdict(cfg), "best_epoch": state["best_epoch"],
                                                             "val_score": state["best"], "seed": seed})
    write_json(out_dir / "history.json", {"history": state["history"], "best_epoch": state["best_epoch"],
                                          "seconds": state["seconds"]})
    return {"model": best_model, "best_epoch": state["best_epoch"], "val_score": state["best"],
            "history": state["history"],
            "val_probs": predict_probs(best_model, bundle.val.images, device=device),
            "test_probs": predict_probs(best_model, bundle.test.images, device=device),
            "n_train_real": n_real, "n_train_synthetic": len(train) - n_real,
            "train_seconds": round(state["seconds"], 1)}
