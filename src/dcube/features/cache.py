"""On-disk cache of extracted feature maps (safetensors, float16).

Features of the frozen denoiser do not depend on the classifier's epoch, so they are
computed once per split and reused, memory-mapped from the file (``load_features(mmap=True)``: the
step-2 loops read one batch of rows at a time, as float32, via ``classify.trainer.rows_of``); the key in the metadata (checkpoint hash, feature
config, data hash) says what they were computed from, and a mismatch means recompute.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dcube.utils.io import load_tensors, mmap_tensors, save_tensors


def save_features(path: str | Path, maps: dict[str, torch.Tensor], key: dict) -> Path:
    return save_tensors(path, {n: m.to(torch.float16) for n, m in maps.items()}, {"key": key})


def load_features(path: str | Path, names: list[str], key: dict, mmap: bool = False) -> dict[str, torch.Tensor] | None:
    """The cached maps (float32 in RAM; with `mmap`, the stored float16, memory-mapped from the file), or
    None when the file is absent or was computed from something else."""
    path = Path(path)
    if not path.exists():
        return None
    tensors, meta = (mmap_tensors if mmap else load_tensors)(path)
    if meta.get("key") != key or any(n not in tensors for n in names):
        return None
    return {n: tensors[n] if mmap else tensors[n].float() for n in names}
