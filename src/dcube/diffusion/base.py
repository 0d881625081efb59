"""The Denoiser interface shared by every backbone (see docs/ARCHITECTURE.md).

A denoiser predicts the noise ``eps`` of a noised image ``x_t`` given the timestep ``t``
and a class condition ``y``; ``y`` is either int64 class ids (N,) or float class
probabilities (N, num_classes) (soft embedding, differentiable in ``y``).

For feature extraction every block has a name (``feature_names``, in forward order);
``feature_modules()`` returns the modules to register forward hooks on and
``to_map(name, output)`` turns what such a hook received into a (N, C, h, w) map.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from dcube.diffusion.embedding import SoftClassEmbedding


class Denoiser(nn.Module):
    """Base class: class-conditional noise predictor with named, hookable blocks.

    Subclasses set ``feature_names``, ``mid_name`` and ``class_embedding`` and implement
    ``forward``, ``feature_modules`` and ``to_map``. ``spec`` holds what is needed to
    rebuild the model (backbone, preset, sizes and the preset's hyper-parameters).
    """

    backbone: str = "?"
    num_classes: int
    in_channels: int
    image_size: int
    preset: Optional[str]
    feature_names: list[str]
    mid_name: str
    class_embedding: SoftClassEmbedding

    def __init__(self, in_channels: int, image_size: int, num_classes: int, preset: Optional[str] = None):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels: must be >= 1, got {in_channels}")
        if image_size < 1:
            raise ValueError(f"image_size: must be >= 1, got {image_size}")
        if num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.preset = preset
        self.spec: dict[str, Any] = {}

    # ------------------------------------------------------------------ interface
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def feature_modules(self) -> dict[str, nn.Module]:  # pragma: no cover
        raise NotImplementedError

    def to_map(self, name: str, output: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @property
    def null_index(self) -> int:
        """Class id of the reserved null class (classifier-free guidance)."""
        return self.num_classes

    def uniform_labels(self, n: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Soft labels (n, num_classes) putting mass 1/num_classes on every class."""
        device = device if device is not None else next(self.parameters()).device
        return torch.full((n, self.num_classes), 1.0 / self.num_classes, device=device)

    def _check_name(self, name: str) -> None:
        if name not in self.feature_names:
            raise KeyError(f"unknown feature name {name!r}; valid names: {self.feature_names}")

    def _prepare(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate shapes; broadcast a scalar ``t``. Returns (t, y)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"t must have shape (N,) = ({n},), got {tuple(t.shape)}")
        y = torch.as_tensor(y, device=x.device)
        if y.is_floating_point():
            if y.ndim != 2 or y.shape[0] != n or not 1 <= y.shape[1] <= self.num_classes + 1:
                raise ValueError(
                    f"soft labels y must have shape (N, num_classes) = ({n}, {self.num_classes}), "
                    f"got {tuple(y.shape)}"
                )
        elif y.shape != (n,):
            raise ValueError(f"class ids y must have shape (N,) = ({n},), got {tuple(y.shape)}")
        return t, y

    @torch.no_grad()
    def feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        """(C, h, w) of every feature map, from one dummy forward pass (batch 1)."""
        p = next(self.parameters())
        x = torch.zeros(1, self.in_channels, self.image_size, self.image_size, device=p.device, dtype=p.dtype)
        t = torch.zeros(1, dtype=torch.long, device=p.device)
        y = torch.zeros(1, dtype=torch.long, device=p.device)
        shapes: dict[str, tuple[int, int, int]] = {}
        handles = []
        for name, module in self.feature_modules().items():

            def hook(_m, _inp, out, name=name):
                shapes[name] = tuple(self.to_map(name, out).shape[1:])

            handles.append(module.register_forward_hook(hook))
        was_training = self.training
        try:
            self.eval()
            self(x, t, y)
        finally:
            self.train(was_training)
            for h in handles:
                h.remove()
        return {name: shapes[name] for name in self.feature_names}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
