"""On-disk cache of extracted feature maps (safetensors, float16).

Features of the frozen denoiser do not depend on the classifier's epoch, so they are computed once
per split and reused. :class:`FeatureWriter` writes them batch by batch as extraction produces them,
and ``load_features(disk=True)`` reads them back as :class:`dcube.utils.rows.DiskRows`: the step-2
loops read one batch of rows at a time, as float32, via ``classify.trainer.rows_of``, so no split's
features are ever held in RAM, whatever its size. The key in the metadata (checkpoint hash, feature
config, data hash) says what they were computed from, and a mismatch means recompute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dcube.utils.io import disk_tensors, load_tensors, save_tensors


def save_features(path: str | Path, maps: dict[str, torch.Tensor], key: dict) -> Path:
    return save_tensors(path, {n: m.to(torch.float16) for n, m in maps.items()}, {"key": key})


def load_features(path: str | Path, names: list[str], key: dict, disk: bool = False) -> dict | None:
    """The cached maps (float32 in RAM; with `disk`, the stored float16 read by rows from the file), or
    None when the file is absent or was computed from something else."""
    path = Path(path)
    if not path.exists():
        return None
    tensors, meta = (disk_tensors if disk else load_tensors)(path)
    if meta.get("key") != key or any(n not in tensors for n in names):
        return None
    return {n: tensors[n] if disk else tensors[n].float() for n in names}


class FeatureWriter:
    """A safetensors feature file written row block by row block (float16), under a temporary name and
    renamed on :meth:`close`: peak memory is one batch. The header (every tensor's shape) is laid out when
    the first block arrives, from its per-row shapes and the total row count `n`. Hand-written because the
    safetensors library writes only whole tensors held in memory; the layout is the format's own (8-byte
    header length, JSON header padded to 8 bytes, tensors back to back in header order)."""

    def __init__(self, path: str | Path, n: int, key: dict):
        self.path, self.n, self.key = Path(path), int(n), key
        self.tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self.fd, self.base, self.spec = None, 0, {}

    def _layout(self, first: dict[str, torch.Tensor]) -> None:
        header, start = {}, 0
        for name, t in first.items():
            shape = [self.n, *t.shape[1:]]
            size = 2 * int(torch.Size(shape).numel())
            header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [start, start + size]}
            self.spec[name] = (start, 2 * int(torch.Size(t.shape[1:]).numel()))
            start += size
        header["__metadata__"] = {"dcube": json.dumps({"key": self.key})}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.path.parent.glob(self.path.name + ".tmp*"):  # a killed writer's, gigabytes each: the
            stale.unlink(missing_ok=True)  # run directory's lock means no live process writes another one
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, 8 + len(raw) + start)
        os.pwrite(self.fd, len(raw).to_bytes(8, "little") + raw, 0)
        self.base = 8 + len(raw)

    def write(self, row: int, maps: dict[str, torch.Tensor]) -> None:
        """Rows row, row+1, ... of every map (any float dtype; stored as float16)."""
        if self.fd is None:
            self._layout(maps)
        for name, t in maps.items():
            start, row_bytes = self.spec[name]
            data = t.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()
            os.pwrite(self.fd, data, self.base + start + int(row) * row_bytes)

    def close(self) -> Path:
        if self.fd is None:
            raise ValueError(f"{self.path}: no features were written")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)
