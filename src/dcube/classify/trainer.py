"""Step-2 training: the D-Cube head on cached hyper-features.

Loss = CE + cycle_weight * cycle + consistency_weight * flip consistency.
The EMA of the head's weights is what is evaluated each epoch on the VALIDATION split,
what selects the best epoch, and what is saved. Resumable from the last epoch.

Several processes (:mod:`dcube.utils.dist`): every rank draws the same batch order and runs its
rank-strided share of each batch; the losses are weighted so that the ranks' average gradient
(:func:`dcube.utils.dist.sync_gradients`, which also averages the batch-norm statistics) is the
whole batch's. Validation predictions are computed batch-sharded and gathered, so every rank
scores, selects and saves the same epoch (files: rank 0). Batch norm sees each rank's rows (on
GPUs too: torch's SyncBatchNorm has no CPU implementation, and the same code runs on both).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dcube.classify.bn import recalibrate_bn
from dcube.classify.head import DCubeHead
from dcube.classify.losses import consistency_loss, cycle_draws, cycle_loss
from dcube.config import ClassifierConfig, ComputeConfig
from dcube.utils import dist
from dcube.utils.compute import Precision, channels_last, memory_format, training_module
from dcube.utils.engine import Engine
from dcube.utils.io import atomic_write_bytes, load_checkpoint, read_json, save_checkpoint, write_json
from dcube.utils.runtime import EMA, Pace, epoch_batches, passes_for

LAST, BEST = "last.safetensors", "best.safetensors"
FEW_STEPS = 200  # fewer optimiser steps in a whole run than this: say so, and name classifier.min_steps
# classifier.subfeature: auto trains one head per candidate and keeps the one validation scores higher
AUTO_CANDIDATES = ("efficientnet-lite0", "resnet18")  # in order of preference on a tie: the paper's ImageNet CNN first
CHOICE = "subfeature.json"  # classifier/: the candidate chosen, with every candidate's validation score
# settings no study or user changed (their keys left the config in dcube 1.0)
CNN_LR = 1e-4  # AdamW learning rate of the pretrained sub-feature CNN (the head's: classifier.lr)
WEIGHT_DECAY = 1e-4  # AdamW weight decay
CYCLE_BATCH = 16  # images per step that go through the frozen denoiser for the cycle loss
CONSISTENCY_BATCH = 32  # images per step whose horizontal flip is also classified for the consistency loss
BN_RECALIBRATION = 1024  # training images that re-estimate the EMA head's BN statistics before each validation
EMA_DECAY = 0.999  # the EMA of the head's weights (the paper's), evaluated and saved
SELECT_METRIC = "auc"  # the validation metric that chooses the epoch (and, with subfeature auto, the CNN)


def ratio_epoch(epoch: int, epochs: int) -> bool:
    """Whether the cycle term's gradient share is measured in (0-based) `epoch`: epochs 1, 2, 4, 8, ... and the
    last. Two extra backward passes on the first batch cost ~15 % of a BreastMNIST epoch when done every epoch;
    they change no weight, so training is the same either way."""
    e = epoch + 1
    return e & (e - 1) == 0 or e == epochs


@dataclass
class FeatureSplit:
    """What the head consumes for one split."""

    feats: list[torch.Tensor]  # selected diffusion feature maps, each (N, C, h, w)
    images: torch.Tensor  # (N, C, H, W) in [-1, 1] for the sub-feature CNN and the cycle loss
    labels: torch.Tensor  # (N,)
    feats_flipped: list[torch.Tensor] | None = None  # features of the flipped images (train)


def rows_of(maps: list[torch.Tensor], rows, device) -> list[torch.Tensor]:
    """One batch of feature maps as float32 on `device`: the cached maps may be float16 and memory-mapped
    (dcube.features.cache), so a split's features never need to sit in RAM as float32."""
    return [f[rows].to(device, torch.float32) for f in maps]


def build_head(cfg: ClassifierConfig, split: FeatureSplit, num_classes: int) -> DCubeHead:
    c, h = split.images.shape[1], split.images.shape[2]
    return DCubeHead([f.shape[1] for f in split.feats], num_classes, c, h, cfg)


@torch.no_grad()
def head_probabilities(head, split: FeatureSplit, batch_size: int = 256, device="cpu") -> torch.Tensor:
    """Class probabilities (N, C); deterministic (eval mode, fixed features). With several
    processes each rank predicts every world-th batch and all get every row, in order."""
    head.eval()
    n = len(split.labels)
    mine = dist.shard_indices(n, block=batch_size)
    out = []
    for s in range(0, len(mine), batch_size):
        rows = mine[s:s + batch_size] if dist.world_size() > 1 else slice(s, s + batch_size)
        feats = rows_of(split.feats, rows, device)
        out.append(head(feats, split.images[rows].to(device)).softmax(1).cpu())
    probs = torch.cat(out) if out else torch.empty(0, head.num_classes)
    return dist.gather_ordered(probs, n, block=batch_size)


def micro_batches(n: int, accum: int = 1) -> tuple[list, list | None]:
    """Rows (positions in a batch of `n`) of this rank's micro-batches, and of every rank's
    (to normalise the losses over the whole batch); micro-batches of fewer than two rows are
    left out (batch norm). One process without accumulation: ``([None], None)``."""
    world = dist.world_size()
    if world == 1 and accum == 1:
        return [None], None
    shares = [[c for c in dist.shard_indices(n, rank_=r, world=world).tensor_split(accum) if len(c) >= 2]
              for r in range(world)]
    return shares[dist.rank()], [c for share in shares for c in share]


def bn_batches(split: FeatureSplit, k: int, batch_size: int, seed: int, device="cpu"):
    """(feature maps, images) batches of a fixed seeded sample of k training rows."""
    rows = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))[:k]
    for s in range(0, len(rows), batch_size):
        r = rows[s:s + batch_size]
        if len(r) >= 2:
            yield rows_of(split.feats, r, device), split.images[r].to(device)


def gradient_ratio(module: torch.nn.Module, ce: torch.Tensor, other: torch.Tensor) -> float:
    """||grad other|| / ||grad ce|| over the module's trainable parameters (graphs kept for backward)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def norm(loss):
        if not loss.requires_grad:
            return 0.0
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum((g.float() ** 2).sum() for g in gs if g is not None)))

    return norm(other) / max(norm(ce), 1e-20)


def _views(train: FeatureSplit, rows, flip, lf: int, cons: bool, device):
    """A micro-batch as it is trained: (images, labels, feature maps) with the `flip`-marked rows swapped for
    their mirror views, and the other view of its first `lf` rows, (maps or None without `cons`, images), for
    the flip-consistency loss."""
    x, y = train.images[rows].to(device), train.labels[rows].to(device)
    feats = rows_of(train.feats, rows, device)
    if flip is None:
        return x, y, feats, rows_of(train.feats_flipped, rows[:lf], device) if cons else None, x[:lf].flip(-1)
    m = flip.to(device)[:, None, None, None]
    mirrored = rows_of(train.feats_flipped, rows, device)
    other = [torch.where(m[:lf], a[:lf], b[:lf]) for a, b in zip(feats, mirrored)] if cons else None
    feats = [torch.where(m, b, a) for a, b in zip(feats, mirrored)]
    return torch.where(m, x.flip(-1), x), y, feats, other, torch.where(m[:lf], x[:lf], x[:lf].flip(-1))


def _param_groups(head, cfg: ClassifierConfig):
    cnn = list(head.cnn.parameters()) if head.cnn is not None else []
    ids = {id(p) for p in cnn}
    rest = [p for p in head.parameters() if id(p) not in ids]
    groups = [{"params": rest, "lr": cfg.lr}]
    if cnn:
        groups.append({"params": cnn, "lr": CNN_LR})
    return groups


@dataclass
class StepPlan:
    """One optimiser step's draws, shared by its micro-batches: the batch rows `idx`; its first `kc` rows also go
    through the cycle loss (with `draws`) and its first `kf` are also classified flipped; `flip` marks the rows
    trained mirrored; `totals`: every rank's rows of the ce, cycle and consistency terms (None: one process and
    no accumulation, the losses need no weights)."""

    idx: torch.Tensor
    kc: int
    kf: int
    draws: tuple | None
    flip: torch.Tensor | None
    totals: tuple[int, int, int] | None


def plan_step(idx, every, step: int, seed: int, shape: tuple, scheduler, use_cycle: bool, use_flip: bool,
              cycle_batch: int, consistency_batch: int) -> StepPlan:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    kc, kf = min(cycle_batch, len(idx)), min(consistency_batch, len(idx))
    draws = cycle_draws(scheduler, (kc, *shape), g) if use_cycle else None
    # random horizontal flips (own generator: the cycle draws stay what they were)
    flip = (torch.rand(len(idx), generator=torch.Generator().manual_seed(seed * 2_000_003 + step)) < 0.5
            if use_flip else None)
    totals = None
    if every is not None:  # normalisers of the whole batch (the rows every rank uses)
        used = torch.cat(every)
        totals = (len(used), int((used < kc).sum()), int((used < kf).sum()))
    return StepPlan(idx, kc, kf, draws, flip, totals)


@dataclass
class HeadLoss:
    """Step 2's loss on the micro-batches of one step: CE + cycle_weight * cycle + consistency_weight * flip
    consistency. `grad_ratio`: the cycle term's share of the gradient, when a step measured it."""

    cfg: ClassifierConfig
    net: torch.nn.Module
    head: torch.nn.Module
    train: FeatureSplit
    denoiser: object
    scheduler: object
    amp: Precision
    layout: object
    device: object
    use_cycle: bool
    use_cons: bool
    grad_ratio: float | None = None

    def micro_batches(self, st: StepPlan, mine: list, epoch: int, measure: bool):
        """Yield ``(loss to backward, ce, cycle, consistency)`` per micro-batch of this rank's rows `mine`, the
        last three weighted as their share of the whole batch. `measure`: record grad_ratio on this step."""
        cfg, layout = self.cfg, self.layout
        for rows in mine:
            bidx = st.idx if rows is None else st.idx[rows]
            lc = st.kc if rows is None else int((rows < st.kc).sum())  # rows ascend: the first lc are cycle rows
            lf = st.kf if rows is None else int((rows < st.kf).sum())
            fl = None if st.flip is None else (st.flip if rows is None else st.flip[rows])
            cons = bool(self.use_cons and lf)  # the first lf rows are also classified flipped
            x, y, feats, other, x_other = _views(self.train, bidx, fl, lf, cons, self.device)
            with self.amp.autocast():
                logits = self.net([layout(f) for f in feats], layout(x))
                logits_f = None
                if other is not None:
                    logits_f = self.net([layout(f) for f in other], layout(x_other))
            logits = logits.float()
            ce = F.cross_entropy(logits, y)
            loss = ce
            cyc = con = torch.zeros(())
            if self.use_cycle and lc:
                d = st.draws if rows is None else (st.draws[0][rows[:lc]], st.draws[1][rows[:lc]])
                with self.amp.autocast():
                    cyc = cycle_loss(self.denoiser, self.scheduler, x[:lc], logits[:lc], y[:lc], draws=d).float()
                loss = loss + cfg.cycle_weight * cyc
            if measure and lc and rows is None:  # the cycle term's share of the gradient
                self.grad_ratio = gradient_ratio(self.head, ce, cfg.cycle_weight * cyc)
            if logits_f is not None:
                con = consistency_loss(logits[:lf], logits_f.float())
                loss = loss + cfg.consistency_weight * con
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step 2: loss became {float(loss)} in epoch {epoch + 1}; "
                                         "lower classifier.lr")
            if rows is not None:  # weights: the ranks' average gradient is the whole batch's
                total_ce, total_c, total_f = st.totals
                ce, cyc, con = ce * (len(rows) / total_ce), cyc * (lc / max(total_c, 1)), con * (lf / max(total_f, 1))
                loss = (ce + cfg.cycle_weight * cyc + cfg.consistency_weight * con) * dist.world_size()
            yield loss, ce, cyc, con


def _engine(cfg: ClassifierConfig, train: FeatureSplit, nc: int, compute: ComputeConfig, out_dir: Path, seed: int,
            device) -> Engine:
    """The head (seeded), its AdamW, the EMA of its weights and the precision."""
    torch.manual_seed(seed)
    head = build_head(cfg, train, nc).to(device)
    dist.broadcast_module(head)
    ema = EMA(head, EMA_DECAY)
    opt = torch.optim.AdamW(_param_groups(head, cfg), weight_decay=WEIGHT_DECAY)
    return Engine(head, opt, ema=ema, amp=Precision(compute.mixed_precision, device), last=out_dir / LAST,
                  modules={"head": head, "ema": ema.module, "opt": opt})


def _check(cfg: ClassifierConfig, train: FeatureSplit, denoiser, scheduler) -> tuple[bool, bool, bool]:
    """Which losses run (cycle, consistency, flips), or a ValueError for what they lack."""
    use_cycle = cfg.cycle_weight > 0
    if use_cycle and (denoiser is None or scheduler is None):
        raise ValueError("classifier.cycle_weight > 0 needs the frozen denoiser and its scheduler")
    if cfg.flip_augment and train.feats_flipped is None:
        raise ValueError("classifier.flip_augment needs the features of the flipped training images "
                         "(FeatureSplit.feats_flipped)")
    has_flipped = train.feats_flipped is not None
    return use_cycle, cfg.consistency_weight > 0 and has_flipped, cfg.flip_augment and has_flipped


def _validate(engine: Engine, train: FeatureSplit, val: FeatureSplit, score_fn, batch_size: int, seed: int, device):
    """The EMA head's validation score and accuracy, after re-estimating its BN statistics on training rows."""
    recalibrate_bn(engine.ema.module, bn_batches(train, BN_RECALIBRATION, batch_size, seed, device))
    probs = head_probabilities(engine.ema.module, val, device=device)
    return score_fn(val.labels.numpy(), probs.numpy())


def train_classifier(cfg: ClassifierConfig, train: FeatureSplit, val: FeatureSplit, class_names: list[str],
                     out_dir: str | Path, score_fn, denoiser=None, scheduler=None, seed: int = 0,
                     device="cpu", on_epoch=None, compute: ComputeConfig | None = None,
                     cycle_batch: int = CYCLE_BATCH, consistency_batch: int = CONSISTENCY_BATCH) -> tuple[DCubeHead, dict]:
    """Train (or resume); returns the best-on-validation EMA head and its summary.

    `score_fn(y_true, probs) -> (score, accuracy)` rates the EMA head on the validation split
    (higher is better); the pipeline passes dcube.evaluate's metric named by
    SELECT_METRIC, so this stage does not depend on the evaluation stage.
    `compute`: mixed precision, gradient accumulation (micro-batches), channels-last; torch.compile
    is for the step-1 denoiser only (the head runs twice per step on different batch sizes).
    """
    compute, out_dir, main = compute or ComputeConfig(), Path(out_dir), dist.is_main()
    out_dir.mkdir(parents=True, exist_ok=True)
    engine = _engine(cfg, train, len(class_names), compute, out_dir, seed, device)
    head, ema = engine.model, engine.ema
    use_cycle, use_cons, use_flip = _check(cfg, train, denoiser, scheduler)
    epoch, best = 0, {"score": -float("inf"), "epoch": -1}
    if state := engine.resume():  # the weights, the loss scale, the step count and the history
        epoch, best = state["epoch"], state["best"]
        if main:
            print(f"[step 2] resuming after epoch {epoch} ({out_dir / LAST})")
    net = training_module(head, ComputeConfig(channels_last=compute.channels_last), "step2")
    if channels_last(compute, "step2"):  # the EMA copy too: BN recalibration and validation run on it
        ema.module.to(memory_format=torch.channels_last)
    losses = HeadLoss(cfg, net, head, train, denoiser, scheduler, engine.amp,
                      partial(memory_format, compute=compute, stage="step2"), device, use_cycle, use_cons)
    n = len(train.labels)
    passes = passes_for(cfg.epochs, cfg.min_steps, n, cfg.batch_size)
    total = cfg.epochs * passes * -(-n // cfg.batch_size)
    if main and total < FEW_STEPS and not cfg.min_steps:
        print(f"[step 2] note: {total} optimiser steps in all ({n} training images, batch {cfg.batch_size}, "
              f"{cfg.epochs} epochs); a small training set may need classifier.min_steps "
              "(docs/benchmarks/robustness.md)")
    pace = Pace("step 2", epoch, cfg.epochs, "epochs", main, after=2)
    for epoch in range(epoch, cfg.epochs):
        head.train()
        # dropout draws: the same whether resumed or not (and different on every rank)
        torch.manual_seed(seed * 7919 + epoch + 1_000_003 * dist.rank())
        sums = {"ce": 0.0, "cycle": 0.0, "consistency": 0.0}
        batches = epoch_batches(n, cfg.batch_size, seed, epoch, passes)
        losses.grad_ratio, measure = None, use_cycle and ratio_epoch(epoch, cfg.epochs)
        for b, idx in enumerate(tqdm(batches, desc=f"step 2: epoch {epoch + 1}/{cfg.epochs}", leave=False,
                                     disable=not main)):
            if len(idx) < 2:  # batch norm needs two samples
                continue
            mine, every = micro_batches(len(idx), compute.grad_accum)
            if every == []:  # every share too small for batch norm
                continue
            st = plan_step(idx, every, engine.steps, seed, tuple(train.images.shape[1:]), scheduler, use_cycle,
                           use_flip, cycle_batch, consistency_batch)
            logged = torch.zeros(3)  # this rank's share of the batch's ce, cycle, consistency
            with engine.step():
                for loss, *parts in losses.micro_batches(st, mine, epoch, measure and b == 0):
                    engine.backward(loss)
                    logged += torch.stack([v.detach().float().cpu() for v in parts])
            for k, v, on in zip(sums, dist.all_sum(logged).tolist(), (True, use_cycle, use_cons)):
                sums[k] += v if on else 0.0
        nb = max(1, len(batches))
        score, acc = _validate(engine, train, val, score_fn, cfg.batch_size, seed, device)
        row = {"epoch": epoch + 1, **{k: v / nb for k, v in sums.items()},
               "val_" + SELECT_METRIC: score, "val_acc": acc, "ema_decay": ema.decay_at(engine.steps)}
        if use_cycle:  # the weighted cycle term against the weighted cross-entropy
            row["cycle_loss_share"] = (cfg.cycle_weight * row["cycle"]) / max(row["ce"], 1e-12)
            if losses.grad_ratio is not None:
                row["cycle_grad_ratio"] = losses.grad_ratio
        engine.history.append(row)
        if main:
            tqdm.write(f"[step 2] epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                                    if isinstance(v, float)))
        pace.tick(epoch + 1)
        if score > best["score"]:
            best = {"score": score, "epoch": epoch + 1, "metric": SELECT_METRIC}
            save_checkpoint(out_dir / BEST, {"head": ema.module}, {"best": best})
        engine.save(epoch=epoch + 1, best=best)
        if on_epoch is not None:
            on_epoch(epoch + 1)
    write_json(out_dir / "history.json", {"history": engine.history, "best": best})
    load_checkpoint(out_dir / BEST, {"head": head})
    head.to(memory_format=torch.contiguous_format)  # evaluated as `dcube predict` loads it (same rounding)
    return head.eval(), best


def resolve_subfeature(cfg: ClassifierConfig, out_dir: str | Path) -> ClassifierConfig:
    """The step-2 configuration the saved head was trained with: ``subfeature: auto`` becomes the CNN
    that validation chose for this run (``classifier/subfeature.json``); any other value is returned as is."""
    if cfg.subfeature != "auto":
        return cfg
    path = Path(out_dir) / CHOICE
    if not path.exists():
        raise FileNotFoundError(f"{path}: classifier.subfeature is 'auto' but no choice was saved; run step 2 first")
    return replace(cfg, subfeature=read_json(path)["chosen"])


def choose_subfeature(bests: dict[str, dict]) -> str:
    """subfeature=auto's rule: the candidate whose best validation score (train_classifier's `best`) is
    highest; equal scores keep the earlier candidate of AUTO_CANDIDATES."""
    return max(AUTO_CANDIDATES, key=lambda n: bests[n]["score"])  # max keeps the first of equal scores


def train_auto(cfg: ClassifierConfig, train: FeatureSplit, val: FeatureSplit, class_names: list[str],
               out_dir: str | Path, score_fn, **kwargs) -> tuple[DCubeHead, dict]:
    """``classifier.subfeature: auto``: a head per candidate CNN (AUTO_CANDIDATES), each trained and
    resumable in ``out_dir/candidates/<name>/`` exactly as a run with that subfeature (train_classifier
    seeds itself, so a candidate does not depend on the others); the one with the higher best VALIDATION
    score wins (a tie keeps the first). Its history and weights become the run's, next to CHOICE."""
    out_dir = Path(out_dir)
    heads, bests = {}, {}
    for name in AUTO_CANDIDATES:
        heads[name], bests[name] = train_classifier(replace(cfg, subfeature=name), train, val, class_names,
                                                    out_dir / "candidates" / name, score_fn, **kwargs)
    chosen = choose_subfeature(bests)
    if dist.is_main():
        print(f"[step 2] sub-feature CNN chosen on validation ({SELECT_METRIC}): {chosen} ("
              + ", ".join(f"{n} {b['score']:.4f} at epoch {b['epoch']}" for n, b in bests.items()) + ")")
    write_json(out_dir / CHOICE, {"chosen": chosen, "metric": SELECT_METRIC, "split": "val",
                                  "candidates": bests})
    for f in ("history.json", BEST):  # BEST last: the stage counts as done only once it exists
        atomic_write_bytes(out_dir / f, (out_dir / "candidates" / chosen / f).read_bytes())
    return heads[chosen], bests[chosen]
