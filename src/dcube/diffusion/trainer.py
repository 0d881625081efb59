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

import collections
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dcube.config import ComputeConfig, DiffusionConfig
from dcube.diffusion import build_denoiser, contrastive_loss, pair_indices
from dcube.diffusion.guidance import drop_labels
from dcube.diffusion.losses import contrastive_loss_paper, pair_within_batch
from dcube.diffusion.schedule import BETA_END, BETA_START, ddpm_scheduler
from dcube.utils import dist
from dcube.utils.compute import Precision, memory_format, training_module
from dcube.utils.engine import Engine
from dcube.utils.io import atomic_write, load_checkpoint, load_tensors, save_checkpoint, write_json
from dcube.utils.plotting import pyplot
from dcube.utils.rows import batches
from dcube.utils.runtime import EMA, Pace

LAST = "last.safetensors"
FINAL = "ema.safetensors"
BEST_EMA = "best_ema.safetensors"  # epochs=auto: the best EMA weights on the validation probe so far


# what a step-1 checkpoint says about its model: enough to rebuild it and its noise schedule, nothing of how
# it was trained (lr, patience, samplers travel with the run's config.yaml, not with the weights)
SPEC_KEYS = ("backbone", "preset", "num_train_timesteps", "class_dropout")
AUTO_MAX_EPOCHS = 1000  # epochs=auto without max_steps: the cap
GRID_STEPS = 50  # DDIM steps of samples.png


def model_meta(cfg: DiffusionConfig, in_channels: int, image_size: int, num_classes: int) -> dict:
    spec = {**{k: getattr(cfg, k) for k in SPEC_KEYS}, "beta_start": BETA_START, "beta_end": BETA_END}
    return {"spec": spec, "in_channels": in_channels, "image_size": image_size, "num_classes": num_classes}


def model_spec(meta: dict) -> dict:
    """The model spec of a checkpoint's metadata; a checkpoint written before 1.0 stored its whole
    DiffusionConfig under "diffusion": its spec keys are read from there."""
    if "spec" in meta:
        return dict(meta["spec"])
    return {k: meta["diffusion"][k] for k in (*SPEC_KEYS, "beta_start", "beta_end") if k in meta.get("diffusion", {})}


def load_denoiser(path: str | Path, device="cpu"):
    """Rebuild the frozen EMA denoiser from `ema.safetensors` (weights + JSON metadata: its model spec).
    -> (model, a DiffusionConfig with the spec's values; the rest of it is the defaults)."""
    _, meta = load_tensors(path)
    spec = model_spec(meta)
    betas = (spec.pop("beta_start", BETA_START), spec.pop("beta_end", BETA_END))
    if betas != (BETA_START, BETA_END):
        raise ValueError(f"{path}: trained with the beta schedule {betas[0]} .. {betas[1]}; dcube uses "
                         f"{BETA_START} .. {BETA_END}")
    cfg = DiffusionConfig(**spec)
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


def paired_micro_batches(n: int, q: int, accum: int = 1) -> list[tuple[torch.Tensor | None, int]]:
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


def make_batch(cfg: DiffusionConfig, labels: torch.Tensor, idx: torch.Tensor, g: torch.Generator,
               num_classes: int, contrastive: bool, sample_shape: tuple = ()):
    """One step's batch from the dataset rows `idx`: ``(rows, y, t, noise, cond, q)`` where `rows` are
    the dataset rows in batch order and the first 2q rows are q (anchor, partner) pairs sharing t and
    noise (anchor i at row i, its partner at q + i). Every draw comes from `g`, in a fixed order
    (t, noise, pairs, dropped labels). `sample_shape`: one image's shape (for the noise). A label
    < 0 marks an unlabelled image: it is denoised under the null class and never paired.

    ``contrastive_form: paper``: disjoint pairs inside the batch, so `rows` is a permutation of `idx`
    (every image denoised exactly once per epoch), each row under its own label.
    ``normalized`` (dcube 0.1): the first quarter of the batch are anchors, their partners (drawn from
    the batch) REPLACE the second quarter's rows, and the 2q paired rows are denoised under the
    uniform class condition (with the true label the class embedding alone satisfied the loss: it
    fell to 0 in 30 steps); the replaced rows are not seen in that step.
    """
    rows, y = idx, labels[idx]
    t = torch.randint(0, cfg.num_train_timesteps, (len(idx),), generator=g)
    noise = torch.randn((len(idx), *sample_shape), generator=g)
    unlabelled = y < 0  # data.unlabelled images: the null class, never paired
    if unlabelled.any():  # labelled rows first, so the pairs below are drawn among them only
        perm = torch.cat([torch.nonzero(~unlabelled).flatten(), torch.nonzero(unlabelled).flatten()])
        rows, y, t, noise = rows[perm], y[perm], t[perm], noise[perm]
    n_lab = int((y >= 0).sum())
    cond = F.one_hot(y.clamp(min=0), num_classes).float()
    paper = contrastive and cfg.contrastive_form == "paper"
    q = n_lab // 4 if contrastive and not paper else 0
    if paper:
        a, b, rest = pair_within_batch(y[:n_lab], g)
        rest = torch.cat([rest, torch.arange(n_lab, len(y))])
        q, perm = len(a), torch.cat([a, b, rest])
        rows, y = rows[perm], y[perm]
        t, noise = torch.cat([t[a], t[a], t[rest]]), torch.cat([noise[a], noise[a], noise[rest]])
        cond = F.one_hot(y.clamp(min=0), num_classes).float()
    elif q:
        p = pair_indices(y[:n_lab], g)[:q]
        keep = torch.arange(2 * q, len(idx))
        rows = torch.cat([rows[:q], rows[p], rows[keep]])
        y = torch.cat([y[:q], y[p], y[keep]])
        uniform = torch.full((2 * q, num_classes), 1.0 / num_classes)
        cond = torch.cat([uniform, F.one_hot(y[2 * q:].clamp(min=0), num_classes).float()])
        t = torch.cat([t[:q], t[:q], t[2 * q:]])
        noise = torch.cat([noise[:q], noise[:q], noise[2 * q:]])
    if getattr(cfg, "class_dropout", 0.0) > 0:  # classifier-free guidance: learn the null class
        cond = drop_labels(cond, cfg.class_dropout, g, start=0 if paper else 2 * q)
    if (y < 0).any():
        if cond.shape[1] == num_classes:
            cond = torch.cat([cond, torch.zeros(len(cond), 1)], dim=1)
        cond[y < 0] = 0.0
        cond[y < 0, num_classes] = 1.0
    return rows, y, t, noise, cond, q


def _evaluate_probe(probe: dict, eval_fn, ema_model, step: int, patience: int, out_dir: Path, meta: dict) -> None:
    """One auto-stop evaluation: score the EMA model, keep it when best, count the patience."""
    was_training = ema_model.training
    score, info = eval_fn(ema_model)
    ema_model.train(was_training)
    probe["curve"].append({"step": step, "score": float(score), "train_seconds": round(probe["train_seconds"], 2),
                           **(info or {})})
    if probe["best"] is None or score > probe["best"]["score"]:
        probe["best"], probe["since_best"] = {"step": step, "score": float(score)}, 0
        save_checkpoint(out_dir / BEST_EMA, {"model": ema_model}, {**meta, "step": step, "score": float(score)})
    else:
        probe["since_best"] += 1
    probe["stopped"] = probe["since_best"] >= patience


def plot_probe_curve(probe: dict, path: Path) -> Path:
    """Validation probe score against step and training CPU-minutes, the chosen step marked."""
    plt = pyplot()

    steps = [p["step"] for p in probe["curve"]]
    scores = [p["score"] for p in probe["curve"]]
    minutes = [p["train_seconds"] / 60 for p in probe["curve"]]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3), sharey=True)
    for ax, x, label in ((axes[0], steps, "optimiser step"), (axes[1], minutes, "training minutes (this machine)")):
        ax.plot(x, scores, marker="o", ms=3)
        i = scores.index(probe["best"]["score"])
        ax.plot([x[i]], [scores[i]], marker="*", ms=12, color="tab:red", label=f"chosen: step {steps[i]}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation probe score")
    axes[0].legend(fontsize=8)
    fig.suptitle("step 1: linear probe of the EMA model's features on validation", fontsize=9)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out


def plan_batches(cfg: DiffusionConfig, labels: torch.Tensor, n: int, sample_shape: tuple, num_classes: int,
                 contrastive: bool, seed: int, first: int, total: int, planned: collections.deque):
    """Steps `first` .. `total` - 1: each step's batch (make_batch), drawn from its epoch's order and its own
    generator, so the same for any resume point or number of reader workers. Appends it to `planned` and yields
    its rows for the reader."""
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    for s in range(first, total):
        epoch, k = divmod(s, steps_per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        g = torch.Generator().manual_seed(seed * 1_000_003 + s)
        planned.append(make_batch(cfg, labels, idx, g, num_classes, contrastive, sample_shape))
        yield planned[-1][0]


def step_losses(cfg: DiffusionConfig, net, mid, sched, amp: Precision, compute: ComputeConfig, batch, device, step):
    """One step's losses, per micro-batch of this rank's rows: ``(loss to backward, mse, contrastive)``, the last
    two weighted as their share of the whole batch. `batch`: ``(x, y, t, noise, cond, q)``."""
    x, y, t, noise, cond, q = batch
    paper = cfg.contrastive_form == "paper"
    for rows, qr in paired_micro_batches(len(x), q, compute.grad_accum):
        xb, yb, tb, nb, cb = (v if rows is None else v[rows] for v in (x, y, t, noise, cond))
        xb, yb, tb, nb, cb = xb.to(device), yb.to(device), tb.to(device), nb.to(device), cb.to(device)
        with amp.autocast():
            eps = net(memory_format(sched.add_noise(xb, nb, tb), compute), tb, cb)
        mse = F.mse_loss(eps.float(), nb) if amp.dtype is not None else F.mse_loss(eps, nb)
        loss, con = mse, torch.zeros(())
        if qr:
            f = mid.out.flatten(1)
            pair_loss = contrastive_loss_paper if paper else contrastive_loss
            con = pair_loss(f[:qr], f[qr:2 * qr], yb[:qr] == yb[qr:2 * qr])  # each form's own margin
            loss = mse + cfg.contrastive_weight * con
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step 1: loss became {loss.item()} at step {step}; lower diffusion.lr")
        if rows is not None:  # weights: the ranks' average gradient is the whole batch's
            w_mse, w_con = len(rows) / len(x), (qr / q if q else 0.0)
            loss = (w_mse * mse + w_con * cfg.contrastive_weight * con) * dist.world_size()
            mse, con = mse * w_mse, con * w_con
        yield loss, mse, con


def _engine(cfg: DiffusionConfig, compute: ComputeConfig, meta: dict, out_dir: Path, device) -> Engine:
    """The denoiser (from a pretrained backbone when cfg.init_from names one), its optimiser, EMA and precision."""
    model = build_denoiser(cfg, meta["in_channels"], meta["image_size"], meta["num_classes"]).to(device)
    if getattr(cfg, "init_from", None):  # a pretrained backbone: all but the class conditioning (a resume overrides)
        from dcube.diffusion.backbone import init_from_backbone

        init_from_backbone(model, cfg.init_from)
    dist.broadcast_module(model)  # replicas start from rank 0's initialisation
    return Engine(model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0),
                  ema=EMA(model, cfg.ema_decay), amp=Precision(compute.mixed_precision, device), last=out_dir / LAST)


def _total_steps(cfg: DiffusionConfig, n: int, eval_fn) -> int:
    auto = cfg.epochs == "auto"
    if auto and eval_fn is None:
        raise ValueError("diffusion.epochs='auto' needs a validation probe (eval_fn)")
    total = (AUTO_MAX_EPOCHS if auto else cfg.epochs) * math.ceil(n / cfg.batch_size)
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


def _finish(cfg: DiffusionConfig, engine: Engine, probe: dict, meta: dict, out_dir: Path, elapsed: float,
            class_names, seed: int, device) -> Path:
    """The model step 2 uses (epochs=auto: the best EMA weights on the validation probe, else the last EMA
    weights), history.json, and the sample grid."""
    ema, step, main = engine.ema, engine.steps, dist.is_main()
    final_meta = {**meta, "step": step}
    record = {"steps": step, "seconds_this_session": elapsed, "history": engine.history}
    if cfg.epochs == "auto":
        load_checkpoint(out_dir / BEST_EMA, {"model": ema.module})
        final_meta.update(chosen_step=probe["best"]["step"], probe_score=probe["best"]["score"])
        record.update(probe=probe["curve"], chosen_step=probe["best"]["step"], chosen_score=probe["best"]["score"],
                      stopped_early=probe["stopped"])
        if main:
            plot_probe_curve(probe, out_dir / "probe_curve.png")
    save_checkpoint(out_dir / FINAL, {"model": ema.module}, final_meta)
    write_json(out_dir / "history.json", record)
    num_classes = meta["num_classes"]
    if cfg.sample_grid and class_names and step > 0:  # an untrained model (epochs 0) draws noise
        from dcube.diffusion.sampling import sample_images, save_grid

        lab = torch.arange(num_classes).repeat_interleave(8)
        imgs = sample_images(ema.module, cfg, lab, sampler="ddim", steps=min(GRID_STEPS, cfg.num_train_timesteps),
                             seed=seed, device=device, progress=main)
        save_grid(imgs, lab, class_names, out_dir / "samples.png")
    return out_dir / FINAL


def train_diffusion(cfg: DiffusionConfig, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    out_dir: str | Path, seed: int = 0, device: torch.device | str = "cpu",
                    class_names: list[str] | None = None, on_step=None,
                    compute: ComputeConfig | None = None, eval_fn=None, workers: int = 0) -> Path:
    """Train (or resume) step 1 on `images` in [-1, 1]; returns the path of the EMA weights.

    `images` may be an on-disk split (:mod:`dcube.utils.rows`); `workers` > 0 reads its batches ahead in
    that many DataLoader processes (:func:`dcube.utils.rows.reader_workers`): the same batches, in the same order.

    `compute`: mixed precision, gradient accumulation (each rank's rows of a batch in
    ``grad_accum`` micro-batches: less memory, the same optimiser steps), torch.compile and
    channels-last; default all off.

    ``cfg.epochs == "auto"``: at every checkpoint (``checkpoint_every`` steps) ``eval_fn(ema_model) -> (score, info)`` rates
    the EMA model (the pipeline passes a linear probe fitted on training images and scored on the
    VALIDATION split); the best-scoring EMA weights are kept (``best_ema.safetensors``) and become
    ``ema.safetensors``, and training stops after ``patience`` evaluations without improvement (or at
    ``max_steps`` / ``AUTO_MAX_EPOCHS``). The curve and the chosen step go into history.json and
    probe_curve.png."""
    compute, out_dir, main = compute or ComputeConfig(), Path(out_dir), dist.is_main()
    out_dir.mkdir(parents=True, exist_ok=True)
    n, c, h, _ = images.shape
    meta = model_meta(cfg, c, h, num_classes)
    engine = _engine(cfg, compute, meta, out_dir, device)
    model, sched, total, auto = engine.model, ddpm_scheduler(cfg), _total_steps(cfg, n, eval_fn), cfg.epochs == "auto"
    probe = {"curve": [], "best": None, "since_best": 0, "train_seconds": 0.0, "stopped": False}
    if state := engine.resume():
        probe = state.get("probe", probe)
        if main:
            print(f"[step 1] resuming from step {engine.steps}/{total} ({out_dir / LAST})")
    mid = _MidFeatures(model) if cfg.contrastive_weight > 0 else None
    net = training_module(model, compute)
    bar = tqdm(total=total, initial=engine.steps, desc="step 1: diffusion", unit="step", disable=not main)
    pace = Pace("step 1", engine.steps, total, "steps", main)
    t0, planned = time.time(), collections.deque()  # the batches whose rows the reader has been given, oldest first
    plan = plan_batches(cfg, labels, n, tuple(images.shape[1:]), num_classes, mid is not None, seed, engine.steps,
                        total, planned)
    for x in batches(images, plan, workers):  # an on-disk split is read ahead in `workers` processes
        if probe["stopped"]:
            break
        t_step, batch = time.time(), (x, *planned.popleft()[1:])
        model.train()
        logged = torch.zeros(2)  # this rank's share of the batch's mse and contrastive loss
        with engine.step():
            for loss, mse, con in step_losses(cfg, net, mid, sched, engine.amp, compute, batch, device, engine.steps):
                engine.backward(loss)
                logged += torch.stack([mse.detach().float().cpu(), con.detach().float().cpu()])
        mse, con = dist.all_sum(logged)
        step = engine.steps
        engine.history.append({"step": step, "mse": mse.item(), "contrastive": con.item()})
        bar.update(1)
        bar.set_postfix(mse=f"{float(mse):.4f}", con=f"{float(con):.3f}")
        pace.tick(step)
        probe["train_seconds"] += time.time() - t_step
        evaluated = auto and (step % cfg.checkpoint_every == 0 or step == total)
        if evaluated:
            _evaluate_probe(probe, eval_fn, engine.ema.module, step, cfg.patience, out_dir, meta)
            if main:
                tqdm.write(f"[step 1] step {step}: validation probe {probe['curve'][-1]['score']:.4f} "
                           f"(best {probe['best']['score']:.4f} at step {probe['best']['step']})")
        if step % cfg.checkpoint_every == 0 or step == total or evaluated:
            engine.save(**meta, probe=probe)
        if on_step is not None:
            on_step(step)
    bar.close()
    if mid is not None:
        mid.handle.remove()
    return _finish(cfg, engine, probe, meta, out_dir, time.time() - t0, class_names, seed, device)
