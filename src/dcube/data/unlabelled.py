"""Unlabelled images for step 1 (``data.unlabelled``, ``data.unlabelled_rest``).

Diffusion training needs no label: an image without one is denoised under the null class, the same
row classifier-free guidance trains. Sources:

* ``data.unlabelled: PATH`` - a folder (every image file below it, any depth), a CSV with a ``path``
  column (relative to the CSV's folder), or an ``.npz`` with an ``images`` array (or MedMNIST's
  ``train_images``); images go through the same decoding and resizing as the labelled ones.
* ``data.unlabelled_rest: true`` - the TRAINING images that ``data.max_train`` / ``minority_ratio``
  left out (the label-fraction studies: the labels of the rest are "dropped").

They only ever reach step 1: :class:`dcube.data.DataBundle` keeps them apart from train/val/test.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import torch

from dcube.data.bundle import DataError
from dcube.data.images import IMAGE_SUFFIXES, check_float_range, read_image


def _folder_files(root: Path) -> list[Path]:
    from dcube.data.folder import looks_like_image

    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                   p.relative_to(root).parts) and (p.suffix.lower() in IMAGE_SUFFIXES or looks_like_image(p)))
    if not files:
        raise DataError(f"data.unlabelled: {root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _csv_files(path: Path) -> list[Path]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"data.unlabelled: {path}: not a readable CSV ({exc})") from exc
    if not rows or "path" not in rows[0]:
        raise DataError(f"data.unlabelled: {path}: needs a 'path' column")
    files = []
    for i, row in enumerate(rows, start=2):
        p = Path(row["path"]).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise DataError(f"data.unlabelled: {path}:{i}: no such file {p}")
        files.append(p)
    return files


def _digest(files: list[Path]) -> str:
    """sha256 over (path, size, mtime) of the files: what the store of their decoded pixels is keyed by."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_unlabelled(path: str | Path, image_size: int, channels: int, store=None) -> tuple[torch.Tensor, list[str]]:
    """(images (N, C, S, S) in [-1, 1], ids) of an unlabelled source; DataError naming it on a problem.

    `store(ids, digest) -> (path, key) | None`: where the decoded images go on disk (the on-disk store of
    ``data.in_memory_mb``, :func:`dcube.data.store.decode`); None keeps them in RAM."""
    from dcube.data.store import decode, decode_array

    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data.unlabelled: {path} does not exist")
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                key = next((k for k in ("images", "train_images") if k in npz.files), None)
                if key is None:
                    raise DataError(f"data.unlabelled: {path}: needs an 'images' (or 'train_images') array, "
                                    f"found {sorted(npz.files)}")
                arr = npz[key]
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"data.unlabelled: {path}: not a readable .npz ({type(exc).__name__}: {exc})") from exc
        if arr.ndim not in (3, 4) or len(arr) == 0:
            raise DataError(f"data.unlabelled: {path}: '{key}' must be (N, H, W) or (N, H, W, 3), got {arr.shape}")
        if not (arr.dtype == np.uint8 or np.issubdtype(arr.dtype, np.floating)):
            raise DataError(f"data.unlabelled: {path}: '{key}' has dtype {arr.dtype}; expected uint8 or float "
                            f"([0, 1] or [0, 255])")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise DataError(f"data.unlabelled: {path}: '{key}' holds NaN/inf values")
        check_float_range(arr, f"data.unlabelled: {path}: '{key}'")
        ids = [f"{path.name}:{key}:{i}" for i in range(len(arr))]
        cache = store(ids, _digest([path])) if store else None
        return decode_array(arr, np.arange(len(arr)), image_size, channels, cache), ids
    files = _folder_files(path) if path.is_dir() else _csv_files(path)
    ids = [str(f) for f in files]
    cache = store(ids, _digest(files)) if store else None

    def fill_files(write):
        for i, f in enumerate(files):
            write(i, read_image(f, image_size, channels)[None])

    return decode((len(files), channels, image_size, image_size), cache, fill_files), ids
