"""The data stage's result types and its error."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Input data is missing, malformed or inconsistent; the message names the file, class or field."""


@dataclass
class Split:
    """One split: images float32 (N, C, H, W) in [-1, 1], labels int64 (N,), one id per image."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DataBundle:
    """Train/val/test splits plus class names and provenance (`info`)."""

    train: Split
    val: Split
    test: Split
    class_names: list[str]
    info: dict = field(default_factory=dict)
    # images without labels for step 1 only (data.unlabelled / unlabelled_rest); never a split
    unlabelled: torch.Tensor | None = None
    unlabelled_ids: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {list(SPLITS)}")
        return getattr(self, name)
