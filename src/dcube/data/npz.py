"""Open a MedMNIST .npz and validate it against the table (keys, shapes, counts, labels, NaN)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from dcube.data.bundle import SPLITS, DataError
from dcube.data.images import check_finite, check_float_range
from dcube.data.medmnist import SIZES, MedMNISTInfo


def _counts_ok(info: MedMNISTInfo, size: int, counts: dict) -> bool:
    legacy = info.legacy_counts if size == 28 else None
    return counts == info.counts or (legacy is not None and counts == legacy)


def load_npz(path: Path, info: MedMNISTInfo, size: Optional[int] = None) -> dict:
    """{split: (images (N, S, S[, C]), labels int64 (N,))}, checked against `info`.

    `size` is the expected image size (None: any MedMNIST size, the same in every split).
    """
    try:
        npz = np.load(path, allow_pickle=False)
        keys = set(npz.files)
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    with npz:
        for s in SPLITS:
            for kind in ("images", "labels"):
                if f"{s}_{kind}" not in keys:
                    raise DataError(f"{path}: missing key '{s}_{kind}' (a MedMNIST file holds "
                                    f"train/val/test _images and _labels; found {sorted(keys)})")
        try:
            arrays = {s: (npz[f"{s}_images"], npz[f"{s}_labels"]) for s in SPLITS}
        except Exception as exc:
            raise DataError(f"{path}: cannot read arrays ({type(exc).__name__}: {exc})") from exc
    sizes = {_check_images(path, info, s, arrays[s][0], size) for s in SPLITS}
    if len(sizes) > 1:
        raise DataError(f"{path}: the splits have different image sizes {sorted(sizes)}")
    counts = {s: len(arrays[s][0]) for s in SPLITS}
    if not _counts_ok(info, sizes.pop(), counts):
        bad = next(s for s in SPLITS if counts[s] != info.counts[s])
        raise DataError(f"{path}: key '{bad}_images' holds {counts[bad]} images; {info.name} has "
                        f"{info.counts[bad]} in its official {bad} split (counts {info.counts})")
    out = {}
    for s, (images, labels) in arrays.items():
        out[s] = (images, _check_labels(path, info, s, labels, len(images)))
        check_finite(images, path, s)
        check_float_range(images, f"{path}: split {s!r} ({s}_images)")
    return out


def _check_images(path, info, split, images, size) -> int:
    key = f"{split}_images"
    shape = images.shape
    gray_ok = info.channels == 1 and (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1))
    rgb_ok = info.channels == 3 and len(shape) == 4 and shape[3] == 3
    square = len(shape) >= 3 and shape[1] == shape[2]
    want = size if size is not None else f"one of {list(SIZES)}"
    if not (gray_ok or rgb_ok) or not square or shape[1] not in SIZES or \
            (size is not None and shape[1] != size):
        layout = "(N, S, S)" if info.channels == 1 else "(N, S, S, 3)"
        raise DataError(f"{path}: key '{key}' has shape {shape}; expected {layout} with S = {want} "
                        f"for {info.name} ({info.channels} channel{'s' if info.channels > 1 else ''})")
    if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
        raise DataError(f"{path}: key '{key}' has dtype {images.dtype}; expected uint8 or float")
    return int(shape[1])


def _check_labels(path, info, split, labels, n) -> np.ndarray:
    key = f"{split}_labels"
    if not (labels.shape == (n,) or labels.shape == (n, 1)):
        raise DataError(f"{path}: key '{key}' has shape {labels.shape}; expected ({n},) or ({n}, 1) "
                        f"to match '{split}_images'")
    labels = labels.reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer):
        if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
            raise DataError(f"{path}: key '{key}' holds non-integer labels")
    labels = labels.astype(np.int64)
    if n and (labels.min() < 0 or labels.max() >= len(info.labels)):
        raise DataError(f"{path}: key '{key}' holds labels outside 0..{len(info.labels) - 1} "
                        f"({info.name} has {len(info.labels)} classes)")
    return labels
