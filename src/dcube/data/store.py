"""Split images on disk: decoded once into a uint8 file of fixed-size rows, read one batch at a time.

A split larger than ``data.in_memory_mb`` (counted as float32) is decoded once into
``run_dir/cache/images/<split>-<members hash>.u8`` with a JSON sidecar holding its shape and key (the data
fingerprint, the split's members and the decoding settings), and every stage reads it through
:class:`dcube.utils.rows.DiskRows`. 8-bit sources at their own size round-trip bit for bit; resized or
16-bit images are quantised to 8 bits (the source precision of PNG/JPEG; after windowing for DICOM/NIfTI).
MONAI's PersistentDataset was the alternative: one file per image, which at 50k images costs more in
file opens than the decode it saves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dcube.utils.io import atomic_write_text
from dcube.utils.rows import Concat, DiskRows, batches, cat_images, is_on_disk  # noqa: F401  (re-exported)


def quantize(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """float in [-1, 1] -> uint8 (exact for 8-bit sources at their own size; else within 1/255 of range)."""
    x = images.numpy() if isinstance(images, torch.Tensor) else images
    return np.clip(np.rint((x.astype(np.float32) + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)


class ImageWriter:
    """Decoded images -> ``<path>`` (uint8 rows) + ``<path>.json`` (shape, key), written under a temporary
    name and renamed when complete: a killed decode leaves no cache that looks finished."""

    def __init__(self, path: str | Path, shape: Sequence[int], key: dict):
        self.path, self.shape, self.key = Path(path), tuple(int(s) for s in shape), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self.row_bytes = int(np.prod(self.shape[1:]))
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.shape[0] * self.row_bytes)

    def write(self, i: int, images: np.ndarray | torch.Tensor) -> None:
        """Rows i, i+1, ... (float in [-1, 1]); safe from several threads (pwrite)."""
        os.pwrite(self.fd, quantize(images).tobytes(), int(i) * self.row_bytes)

    def close(self) -> DiskRows:
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.tmp, self.path)
        atomic_write_text(self.path.with_name(self.path.name + ".json"),
                          json.dumps({"shape": list(self.shape), "dtype": "uint8", "key": self.key}))
        return DiskRows(self.path, self.shape, "uint8", image=True)

    def abort(self) -> None:
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)


def open_images(path: str | Path, key: dict) -> DiskRows | None:
    """The cached split at `path` when it was decoded from what `key` describes, else None."""
    path = Path(path)
    side = path.with_name(path.name + ".json")
    if not (path.exists() and side.exists()):
        return None
    try:
        meta = json.loads(side.read_text())
    except ValueError:
        return None
    if meta.get("key") != key:
        return None
    return DiskRows(path, meta["shape"], "uint8", image=True)




def decode(shape: Sequence[int], cache: tuple[Path, dict] | None, fill) -> torch.Tensor | DiskRows | None:
    """The images of one split, (N, C, S, S) in [-1, 1], decoded once by ``fill(write)``: it calls
    ``write(row, images)`` for each chunk (float32 rows starting at `row`, in any order, from any thread).

    With `cache` = (path, key) the rows go to the uint8 store at `path`, which is reused without
    decoding when its key and shape match; a fill that raises, or returns False (a pass whose failures
    the caller reports), leaves no store behind (-> None for False). Without `cache`: one float32 tensor.
    The one read-or-decode path of every image source (files, arrays, data.unlabelled)."""
    shape = tuple(int(s) for s in shape)
    if cache is None:
        images = torch.empty(shape, dtype=torch.float32)

        def into(row: int, x) -> None:
            images[row:row + len(x)] = torch.as_tensor(x)

        fill(into)
        return images
    done = open_images(*cache)
    if done is not None and tuple(done.shape) == shape:
        return done
    writer = ImageWriter(cache[0], shape, cache[1])
    try:
        ok = fill(writer.write)
    except BaseException:
        writer.abort()
        raise
    if ok is False:
        writer.abort()
        return None
    return writer.close()


def decode_array(arr: np.ndarray, rows: np.ndarray, image_size: int, channels: int,
                 cache: tuple[Path, dict] | None) -> torch.Tensor | DiskRows:
    """Rows `rows` of an in-memory image array (N, H, W[, 3]) as float32 in RAM, or through :func:`decode`
    into the store at `cache`, 1,024 rows at a time (no float32 copy of the whole split)."""
    from dcube.data.images import array_to_tensor

    if cache is None:
        return array_to_tensor(arr[rows], image_size, channels)

    def fill(write):
        for a in range(0, len(rows), 1024):
            write(a, array_to_tensor(arr[rows[a:a + 1024]], image_size, channels))

    return decode((len(rows), channels, image_size, image_size), cache, fill)
