"""Arrays on disk read one batch of rows at a time (``os.pread``), and batches fed through a DataLoader.

:class:`DiskRows` backs the on-disk image store (:mod:`dcube.data.store`) and the feature cache
(:mod:`dcube.features.cache`). Reads go through the page cache, not a memory map, so the process's
resident memory stays O(batch) whatever the array's size (a memory map counts every page it touched).
Hand-written because neither numpy's memmap nor safetensors' loaders read rows without mapping or
copying the whole array.

:func:`batches` feeds a list of index batches through a ``torch.utils.data.DataLoader`` with
``workers`` processes (0: in this process): the batches, and so every result, are the same for any
number of workers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

_TORCH = {np.dtype("uint8"): torch.uint8, np.dtype("float16"): torch.float16, np.dtype("float32"): torch.float32,
          np.dtype("float64"): torch.float64, np.dtype("int64"): torch.int64, np.dtype("int32"): torch.int32}


def row_index(key, n: int) -> np.ndarray:
    """int | slice | index list/array/tensor | bool mask over n rows -> int64 row numbers (negatives wrap)."""
    if isinstance(key, (int, np.integer)):
        return np.array([key + n if key < 0 else key])
    if isinstance(key, slice):
        return np.arange(n)[key]
    idx = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    if idx.dtype == bool:
        return np.flatnonzero(idx)
    idx = idx.astype(np.int64).reshape(-1)
    return np.where(idx < 0, idx + n, idx)


class DiskRows:
    """A read-only (N, ...) array stored row-major at `offset` in `path`; indexing returns torch tensors.

    ``image=True``: the file holds uint8 pixels and rows come back as float32 in [-1, 1] (``x / 255 * 2 - 1``).
    Supports what the pipeline asks of an image or feature tensor: ``len``, ``shape``, ``dtype``,
    ``rows[int | slice | index list/array/tensor]`` and ``flip(-1)`` (a view read mirrored)."""

    def __init__(self, path: str | Path, shape: Sequence[int], dtype: str, offset: int = 0, image: bool = False,
                 flipped: bool = False):
        self.path, self.offset, self.image, self.flipped = Path(path), int(offset), image, flipped
        self.np_dtype = np.dtype(dtype).newbyteorder("<")
        self.shape = torch.Size(int(s) for s in shape)
        self.row_items = int(np.prod(self.shape[1:], dtype=np.int64))
        self.row_bytes = self.row_items * self.np_dtype.itemsize
        self.dtype = torch.float32 if image else _TORCH[np.dtype(dtype)]
        need = self.offset + len(self) * self.row_bytes
        if self.path.stat().st_size < need:
            raise ValueError(f"{self.path}: {self.path.stat().st_size} bytes, expected at least {need} for "
                             f"{tuple(self.shape)} {dtype}")
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return int(self.shape[0])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getstate__(self):  # DataLoader workers reopen the file
        return {**self.__dict__, "_fd": None, "_pid": None}

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def flip(self, dim: int) -> "DiskRows":
        if dim not in (-1, self.ndim - 1):
            raise ValueError("DiskRows.flip: only the last (width) axis")
        return DiskRows(self.path, self.shape, self.np_dtype.str, self.offset, self.image, not self.flipped)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, tuple):
            raise TypeError("DiskRows: index rows only (rows[idx]), then slice the tensor")
        rows = row_index(key, len(self))
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"{self.path}: row index out of range for {len(self)} rows")
        out = np.empty((len(rows), self.row_items), dtype=self.np_dtype)
        fd, k = self._file(), 0
        while k < len(rows):  # one read per run of consecutive rows
            j = k + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            want = (j - k) * self.row_bytes
            buf = os.pread(fd, want, self.offset + int(rows[k]) * self.row_bytes)
            if len(buf) != want:
                raise OSError(f"{self.path}: short read (the file changed while in use?)")
            out[k:j] = np.frombuffer(buf, dtype=self.np_dtype).reshape(j - k, self.row_items)
            k = j
        t = torch.from_numpy(out.reshape((len(rows), *self.shape[1:])))
        if self.image:
            t = (t.float() / 255.0) * 2.0 - 1.0  # as dcube.data.images scales 8-bit pixels: bit-identical
        if self.flipped:
            t = t.flip(-1)
        return t[0] if isinstance(key, (int, np.integer)) else t


class Concat:
    """Row-wise concatenation of tensors and :class:`DiskRows` (labelled + unlabelled, real + synthetic)
    without copying: ``rows[idx]`` gathers from each part."""

    def __init__(self, parts: list):
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = torch.Size((int(self.starts[-1]), *self.parts[0].shape[1:]))
        self.dtype, self.ndim = torch.float32, len(self.shape)

    def __len__(self) -> int:
        return int(self.shape[0])

    def flip(self, dim: int) -> "Concat":
        return Concat([p.flip(dim) for p in self.parts])

    def __getitem__(self, key) -> torch.Tensor:
        rows = row_index(key, len(self))
        part = np.searchsorted(self.starts, rows, side="right") - 1
        out = torch.empty((len(rows), *self.shape[1:]), dtype=torch.float32)
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            out[torch.from_numpy(sel)] = self.parts[p][torch.from_numpy(rows[sel] - self.starts[p])].float()
        return out[0] if isinstance(key, (int, np.integer)) else out


def cat_images(parts: list):
    """torch.cat when every part is in RAM; a :class:`Concat` view when one is on disk."""
    parts = [p for p in parts if p is not None]
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    return Concat(parts)


def is_on_disk(x) -> bool:
    return isinstance(x, (DiskRows, Concat))


class _Rows(torch.utils.data.Dataset):
    """images[key] for a key the sampler yields (a batch of row indices or a slice)."""

    def __init__(self, images):
        self.images = images

    def __getitem__(self, idx):
        return self.images[idx]


def reader_workers() -> int:
    """DataLoader processes that read an on-disk split ahead: none on a machine of 2 cores or fewer (they
    would compete with training for them), else half the cores, at most 4. The batches are the same for any
    number (this only moves the reading)."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores // 2)


def batches(images, index: Iterable, workers: int = 0) -> Iterator[torch.Tensor]:
    """``images[idx]`` for each index batch in `index`, in order; with ``workers`` > 0 the reads run ahead in
    that many DataLoader processes (the same tensors, in the same order). `index` is consumed lazily, at
    most ``2 * workers`` batches ahead of the caller (a generator of the training steps' rows works)."""
    if workers <= 0 or not is_on_disk(images):
        for idx in index:
            yield images[idx]
        return
    loader = torch.utils.data.DataLoader(_Rows(images), sampler=index, batch_size=None, shuffle=False,
                                         num_workers=workers, prefetch_factor=2, persistent_workers=False)
    yield from loader
