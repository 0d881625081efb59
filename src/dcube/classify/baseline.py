"""A plain supervised CNN (MONAI ResNet-18, EfficientNet-Lite0, ...) trained on images, optionally
with synthetic training images: the baseline of the rebalancing experiment.

Adam, a fixed number of epochs, the best epoch chosen on the VALIDATION split (``score_fn``,
e.g. AUC) and its weights saved; an optional EMA of the weights is what gets validated.
Synthetic images enter only through :func:`dcube.generate.augment_train` (the training split);
val and test are checked to hold real images only. Metrics are computed by the caller
(``dcube.evaluate``), so this stage does not import a later one.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dcube.classify.subfeatures import PLAIN_NAMES, build_plain_classifier
from dcube.data import DataBundle
from dcube.generate import SyntheticSet, assert_real, augment_train
from dcube.utils.io import save_checkpoint, write_json
from dcube.utils.runtime import EMA

BEST = "best.safetensors"


@dataclass
class BaselineConfig:
    model: str = "resnet18"  # resnet18 | resnet50 | efficientnet-lite0 (build_plain_classifier)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.0  # 0 = no EMA; else the EMA weights are validated and saved
    synthetic_ratio: Optional[float] = None  # at most ratio * len(train) synthetic images; None = all

    def __post_init__(self):
        if self.model not in PLAIN_NAMES:
            raise ValueError(f"baseline.model: {self.model!r} is not one of {list(PLAIN_NAMES)}")
        for k in ("epochs", "batch_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"baseline.{k}: must be >= 1, got {getattr(self, k)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"baseline.ema_decay: must lie in [0, 1), got {self.ema_decay}")


@torch.no_grad()
def predict_probs(model, images: torch.Tensor, batch_size: int = 256, device="cpu") -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[s:s + batch_size].to(device)).softmax(1).cpu()
                      for s in range(0, len(images), batch_size)])


def train_baseline(cfg: BaselineConfig, bundle: DataBundle, out_dir: str | Path,
                   score_fn: Callable[[torch.Tensor, torch.Tensor], float], seed: int = 0,
                   synthetic: SyntheticSet | None = None, device="cpu") -> dict:
    """Train on ``bundle.train`` (+ `synthetic`), select on ``bundle.val``, predict ``bundle.test``.

    `score_fn(y_true, probs)` -> validation score, higher is better. Returns a dict with the
    best model (``model``), ``best_epoch``, ``history``, ``val_probs``, ``test_probs`` and
    the number of real / synthetic training images; writes best.safetensors and history.json.
    """
    out_dir = Path(out_dir)
    assert_real(bundle.val, "val"), assert_real(bundle.test, "test")
    train = augment_train(bundle, synthetic, cfg.synthetic_ratio, seed) if synthetic is not None else bundle.train
    n_real = len(bundle.train)
    c, h = train.images.shape[1], train.images.shape[2]
    torch.manual_seed(seed)
    model = build_plain_classifier(cfg.model, c, bundle.num_classes, h).to(device)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(train)
    best, best_state, history, step = -float("inf"), None, [], 0
    bar = tqdm(total=cfg.epochs * -(-n // cfg.batch_size), desc=f"baseline {cfg.model}", unit="step")
    t0 = time.time()
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        model.train()
        losses = []
        for s in range(0, n, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            loss = F.cross_entropy(model(train.images[idx].to(device)), train.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if ema is not None:
                ema.update(model, step)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        judged = ema.module if ema is not None else model
        score = float(score_fn(bundle.val.labels, predict_probs(judged, bundle.val.images, device=device)))
        history.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "val_score": score})
        if score > best:
            best, best_epoch, best_state = score, epoch + 1, copy.deepcopy(judged.state_dict())
    bar.close()
    judged = ema.module if ema is not None else model
    judged.load_state_dict(best_state)
    save_checkpoint(out_dir / BEST, {"model": judged}, {"config": asdict(cfg), "best_epoch": best_epoch,
                                                        "val_score": best, "seed": seed})
    write_json(out_dir / "history.json", {"history": history, "best_epoch": best_epoch, "seconds": time.time() - t0})
    return {"model": judged, "best_epoch": best_epoch, "val_score": best, "history": history,
            "val_probs": predict_probs(judged, bundle.val.images, device=device),
            "test_probs": predict_probs(judged, bundle.test.images, device=device),
            "n_train_real": n_real, "n_train_synthetic": len(train) - n_real,
            "train_seconds": round(time.time() - t0, 1)}
