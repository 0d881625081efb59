"""Step-2 training: the D-Cube head on cached hyper-features.

Loss = ce_weight * CE + cycle_weight * cycle + consistency_weight * flip consistency.
The EMA of the head's weights is what is evaluated each epoch on the VALIDATION split,
what selects the best epoch, and what is saved. Resumable from the last epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dcube.classify.head import DCubeHead
from dcube.classify.losses import consistency_loss, cycle_loss
from dcube.config import ClassifierConfig
from dcube.utils.io import load_checkpoint, save_checkpoint, write_json
from dcube.utils.runtime import EMA

LAST, BEST = "last.safetensors", "best.safetensors"


@dataclass
class FeatureSplit:
    """What the head consumes for one split."""

    feats: list[torch.Tensor]  # selected diffusion feature maps, each (N, C, h, w)
    images: torch.Tensor  # (N, C, H, W) in [-1, 1] for the sub-feature CNN and the cycle loss
    labels: torch.Tensor  # (N,)
    feats_flipped: list[torch.Tensor] | None = None  # features of the flipped images (train)


def build_head(cfg: ClassifierConfig, split: FeatureSplit, num_classes: int) -> DCubeHead:
    c, h = split.images.shape[1], split.images.shape[2]
    return DCubeHead([f.shape[1] for f in split.feats], num_classes, c, h, cfg)


@torch.no_grad()
def predict(head, split: FeatureSplit, batch_size: int = 256, device="cpu") -> torch.Tensor:
    """Class probabilities (N, C); deterministic (eval mode, fixed features)."""
    head.eval()
    out = []
    for s in range(0, len(split.labels), batch_size):
        feats = [f[s:s + batch_size].to(device) for f in split.feats]
        out.append(head(feats, split.images[s:s + batch_size].to(device)).softmax(1).cpu())
    return torch.cat(out)


def _param_groups(head, cfg: ClassifierConfig):
    cnn = list(head.cnn.parameters()) if head.cnn is not None else []
    ids = {id(p) for p in cnn}
    rest = [p for p in head.parameters() if id(p) not in ids]
    groups = [{"params": rest, "lr": cfg.lr}]
    if cnn:
        groups.append({"params": cnn, "lr": cfg.cnn_lr})
    return groups


def train_classifier(cfg: ClassifierConfig, train: FeatureSplit, val: FeatureSplit, class_names: list[str],
                     out_dir: str | Path, score_fn, denoiser=None, scheduler=None, seed: int = 0,
                     device="cpu", on_epoch=None) -> tuple[DCubeHead, dict]:
    """Train (or resume); returns the best-on-validation EMA head and its summary.

    `score_fn(y_true, probs) -> (score, accuracy)` rates the EMA head on the validation split
    (higher is better); the pipeline passes dcube.evaluate's metric named by
    `cfg.select_metric`, so this stage does not depend on the evaluation stage.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nc = len(class_names)
    torch.manual_seed(seed)
    head = build_head(cfg, train, nc).to(device)
    ema = EMA(head, cfg.ema_decay)
    opt = torch.optim.AdamW(_param_groups(head, cfg), weight_decay=cfg.weight_decay)
    weight = None
    if cfg.class_weighting:
        counts = torch.bincount(train.labels, minlength=nc).float()
        weight = (counts.sum() / (nc * counts.clamp(min=1))).to(device)
    use_cycle = cfg.cycle_weight > 0
    if use_cycle and (denoiser is None or scheduler is None):
        raise ValueError("classifier.cycle_weight > 0 needs the frozen denoiser and its scheduler")
    use_cons = cfg.consistency_weight > 0 and train.feats_flipped is not None
    epoch, step, history, best = 0, 0, [], {"score": -float("inf"), "epoch": -1}
    if (out_dir / LAST).exists():
        state = load_checkpoint(out_dir / LAST, {"head": head, "ema": ema.module, "opt": opt})
        epoch, step, history, best = state["epoch"], state["step"], state["history"], state["best"]
        print(f"[step 2] resuming after epoch {epoch} ({out_dir / LAST})")
    n = len(train.labels)
    for epoch in range(epoch, cfg.epochs):
        head.train()
        torch.manual_seed(seed * 7919 + epoch)  # dropout draws: the same whether resumed or not
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        sums = {"ce": 0.0, "cycle": 0.0, "consistency": 0.0}
        batches = range(0, n, cfg.batch_size)
        for s in tqdm(batches, desc=f"step 2: epoch {epoch + 1}/{cfg.epochs}", leave=False):
            idx = order[s:s + cfg.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            x, y = train.images[idx].to(device), train.labels[idx].to(device)
            logits = head([f[idx].to(device) for f in train.feats], x)
            ce = F.cross_entropy(logits, y, weight=weight)
            loss = cfg.ce_weight * ce
            if use_cycle:
                k = min(cfg.cycle_batch, len(idx))
                cyc = cycle_loss(denoiser, scheduler, x[:k], logits[:k], y[:k], g)
                loss = loss + cfg.cycle_weight * cyc
                sums["cycle"] += cyc.item()
            if use_cons:
                k = min(cfg.consistency_batch, len(idx))
                logits_f = head([f[idx[:k]].to(device) for f in train.feats_flipped], x[:k].flip(-1))
                con = consistency_loss(logits[:k], logits_f)
                loss = loss + cfg.consistency_weight * con
                sums["consistency"] += con.item()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step 2: loss became {float(loss)} in epoch {epoch + 1}; "
                                         "lower classifier.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            ema.update(head, step)
            sums["ce"] += ce.item()
        nb = max(1, len(batches))
        probs = predict(ema.module, val, device=device)
        score, acc = score_fn(val.labels.numpy(), probs.numpy())
        row = {"epoch": epoch + 1, **{k: v / nb for k, v in sums.items()},
               "val_" + cfg.select_metric: score, "val_acc": acc}
        history.append(row)
        tqdm.write(f"[step 2] epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()
                                                                if isinstance(v, float)))
        if score > best["score"]:
            best = {"score": score, "epoch": epoch + 1, "metric": cfg.select_metric}
            save_checkpoint(out_dir / BEST, {"head": ema.module}, {"best": best})
        save_checkpoint(out_dir / LAST, {"head": head, "ema": ema.module, "opt": opt},
                        {"epoch": epoch + 1, "step": step, "history": history, "best": best})
        if on_epoch is not None:
            on_epoch(epoch + 1)
    write_json(out_dir / "history.json", {"history": history, "best": best})
    load_checkpoint(out_dir / BEST, {"head": head})
    return head.eval(), best
