"""How many synthetic images each class gets."""

from __future__ import annotations

import math
from typing import Sequence


def per_class_counts(num_classes: int, n: int) -> list[int]:
    """`n` images for every class."""
    if n < 0:
        raise ValueError(f"--per-class: must be >= 0, got {n}")
    return [int(n)] * num_classes


def balance_counts(class_counts: Sequence[int], ratio: float = 1.0) -> list[int]:
    """Extra images per class so that every class reaches ``ceil(ratio * largest class)``.

    ``ratio=1`` tops every class up to the largest one; ``ratio=0.5`` only up to half of it.
    A class already at or above the target gets 0.
    """
    counts = [int(c) for c in class_counts]
    if not counts or min(counts) < 0:
        raise ValueError(f"class counts: expected non-negative counts, got {counts}")
    if not ratio > 0:
        raise ValueError(f"--balance ratio: must be > 0, got {ratio}")
    target = math.ceil(ratio * max(counts) - 1e-9)
    return [max(0, target - c) for c in counts]
