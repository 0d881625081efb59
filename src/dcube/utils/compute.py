"""The ``compute`` switches of a training loop: mixed precision, torch.compile, channels-last.

All default off; off, these helpers return the model and the loss unchanged and open no
context, so a default run computes exactly what it did without them. Mixed precision is
PyTorch's own AMP (``torch.autocast`` + ``torch.amp.GradScaler`` for fp16), the mechanism
Accelerate's ``Accelerator(mixed_precision=...)`` wraps.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: utils never imports config at run time
    from dcube.config import ComputeConfig

_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast for the forward pass, loss scaling for fp16 (``compute.mixed_precision``)."""

    def __init__(self, mode: str, device: torch.device | str):
        if mode not in _DTYPES:
            raise ValueError(f"compute.mixed_precision: {mode!r} is not one of {list(_DTYPES)}")
        self.mode, self.dtype = mode, _DTYPES[mode]
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, opt: torch.optim.Optimizer) -> None:
        """``opt.step()``; with fp16 unscaled first and skipped when a gradient overflowed."""
        if self.scaler is None:
            opt.step()
            return
        self.scaler.step(opt)
        self.scaler.update()

    def state(self) -> dict:
        """JSON-able state for a checkpoint (the fp16 loss scale)."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def channels_last(compute: ComputeConfig, stage: str) -> bool:
    """Whether `stage` ("step1", "step2") trains in channels-last layout under ``compute.channels_last``
    (no | step2 | all; a bool, as code may pass, means all or no)."""
    v = compute.channels_last
    return v is True or v == "all" or (v == "step2" and stage == "step2")


def training_module(model: torch.nn.Module, compute: ComputeConfig, stage: str = "step1"):
    """What the training loop of `stage` calls: `model` itself, in channels-last memory format and/or
    wrapped by ``torch.compile`` when switched on. The wrapper shares the parameters; save and
    average `model`, never the wrapper (its state-dict keys carry an ``_orig_mod.`` prefix)."""
    if channels_last(compute, stage):
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compute.compile else model


def memory_format(x: torch.Tensor, compute: ComputeConfig, stage: str = "step1") -> torch.Tensor:
    """`x` in channels-last layout when switched on for `stage` (4-D image batches only)."""
    if x.ndim == 4 and channels_last(compute, stage):
        return x.contiguous(memory_format=torch.channels_last)
    return x
