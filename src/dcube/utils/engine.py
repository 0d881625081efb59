"""The optimiser step every dcube trainer takes, written once.

A trainer is a batch plan and a loss on each batch; :class:`Engine` does the rest of a step: zero the
gradients, backward each micro-batch's loss (fp16: scaled), average the ranks' gradients
(:func:`dcube.utils.dist.sync_gradients`; nothing in one process), step the optimiser (fp16: skipped on an
overflow), count the step and update the EMA. It owns the resumable checkpoint (its modules, the loss
scale, the step and the history), and :class:`Best` keeps the weights that scored best on validation::

    engine = Engine(model, opt, last=out_dir / "last.safetensors", ema=EMA(model, 0.999))
    engine.resume()                                  # {} for a fresh run, else the saved metadata
    while engine.steps < total:
        loss = loss_fn(plan(engine.steps))           # the trainer's own part
        with engine.step():
            engine.backward(loss)
        engine.history.append({"step": engine.steps, "loss": loss.item()})
        if engine.steps % every == 0 or engine.steps == total:
            engine.save()

Hand-written rather than a library's (Accelerate, Lightning): the losses of step 2 run the head twice per
step and the cycle loss runs a frozen denoiser inside the graph, which DistributedDataParallel rejects,
and every rank's loss is already weighted so that the ranks' average gradient is the whole batch's.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dcube.utils import dist
from dcube.utils.compute import Precision
from dcube.utils.io import load_checkpoint, save_checkpoint


class Engine:
    """`model` trained by `opt`; `ema` (a :class:`dcube.utils.runtime.EMA`) updated after every step; `amp` the
    mixed precision (default none); `last` the resumable checkpoint (None: not resumable); `modules` what it
    holds (default the model, the optimiser and the EMA copy, under the names "model", "opt", "ema")."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, *, ema=None, amp: Precision | None = None,
                 last: str | Path | None = None, modules: dict[str, Any] | None = None):
        self.model, self.opt, self.ema = model, opt, ema
        self.amp = amp or Precision("no", "cpu")
        self.last = Path(last) if last is not None else None
        self.modules = modules if modules is not None else {
            "model": model, "opt": opt, **({"ema": ema.module} if ema is not None else {})}
        self.steps = 0
        self.history: list[dict] = []

    @contextmanager
    def step(self):
        """One optimiser step: the gradients are zeroed on entry; on exit the ranks' gradients are averaged,
        the optimiser steps, the step count rises and the EMA follows."""
        self.opt.zero_grad(set_to_none=True)
        yield self
        dist.sync_gradients(self.model)
        self.amp.step(self.opt)
        self.steps += 1
        if self.ema is not None:
            self.ema.update(self.model, self.steps)

    def backward(self, loss: torch.Tensor) -> None:
        self.amp.backward(loss)

    def resume(self) -> dict:
        """Restore the last checkpoint when there is one: the modules, the loss scale, the step count and the
        history; returns its metadata ({} for a fresh run)."""
        if self.last is None or not self.last.exists():
            return {}
        meta = load_checkpoint(self.last, self.modules)
        self.steps, self.history = meta.get("step", 0), meta.get("history", [])
        self.amp.load_state(meta.get("amp"))
        return meta

    def save(self, **extra) -> Path:
        """Write the resumable checkpoint (atomically): the modules, the step, the history, the loss scale
        and `extra` (JSON-able metadata the trainer resumes from)."""
        amp = {"amp": self.amp.state()} if self.amp.scaler is not None else {}
        return save_checkpoint(self.last, self.modules, {"step": self.steps, "history": self.history, **amp, **extra})


class Best:
    """The weights of `module` that scored highest so far (strictly higher replaces), with the score and the
    epoch; `score`/`module` given: the starting point to beat (e.g. before any training)."""

    def __init__(self, score: float = -float("inf"), module: torch.nn.Module | None = None, epoch: int = 0):
        self.score, self.epoch = score, epoch
        self.state = copy.deepcopy(module.state_dict()) if module is not None else None

    def update(self, score: float, module: torch.nn.Module, epoch: int) -> bool:
        if score > self.score:
            self.score, self.epoch, self.state = score, epoch, copy.deepcopy(module.state_dict())
            return True
        return False

    def restore(self, module: torch.nn.Module) -> torch.nn.Module:
        module.load_state_dict(self.state)
        return module
