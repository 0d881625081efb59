"""Image-file entries -> a checked train/val/test assignment -> a DataBundle of tensors."""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dcube.config import DataConfig
from dcube.data.bundle import SPLITS, DataError, Split
from dcube.data.folder import Entry, sort_classes
from dcube.data.images import read_image
from dcube.data.splitfile import SPLIT_FILE, read_splits, write_splits
from dcube.data.splits import grouped_split, stratified_split

PROGRESS_ABOVE = 500  # show a progress bar when reading more files than this


def assign_splits(entries: list[Entry], cfg: DataConfig, seed: int) -> np.ndarray:
    """Predefined splits are kept; otherwise a seeded stratified (grouped by patient) split.
    A predefined layout without val or test gets it carved out of train."""
    labels = np.array([e.label for e in entries])
    groups = np.array([e.group or "" for e in entries])
    grouped = all(e.group is not None for e in entries)

    def split(idx, val, test):
        if grouped:
            return grouped_split(labels[idx], groups[idx], val, test, seed)
        return stratified_split(labels[idx], val, test, seed)

    given = np.array([e.split or "" for e in entries], dtype="<U5")
    if not all(given):
        return split(np.arange(len(entries)), cfg.val_fraction, cfg.test_fraction)
    present = set(given)
    if present < set(SPLITS) and "train" in present:
        tr = np.flatnonzero(given == "train")
        given[tr] = split(tr, 0.0 if "val" in present else cfg.val_fraction,
                          0.0 if "test" in present else cfg.test_fraction)
    return given


def reuse_splits(entries: list[Entry], file: Path, root: Path) -> tuple[list[Entry], np.ndarray]:
    """Take the assignment from an existing splits.csv; entries it does not list are dropped."""
    saved = read_splits(file, root)
    present = {e.path for e in entries}
    gone = [p for p in saved if p not in present]
    if gone:
        raise DataError(f"{file} lists {len(gone)} image(s) that are no longer in the data, e.g. "
                        f"{gone[0]}; restore them or start a new run directory")
    kept = [e for e in entries if e.path in saved]
    if len(kept) < len(entries):
        warnings.warn(f"{len(entries) - len(kept)} image(s) are not in {file} and are left out "
                      f"to keep the saved split", stacklevel=3)
    for e in kept:
        if saved[e.path][0] != e.label:
            raise DataError(f"{file}: {e.path} has label {saved[e.path][0]!r} there but "
                            f"{e.label!r} in the data ({e.where})")
    return kept, np.array([saved[e.path][1] for e in kept], dtype="<U5")


def check_splits(entries: list[Entry], splits: np.ndarray, cfg: DataConfig, source: str) -> list[str]:
    """Raise DataError for <2 classes, an empty split, a val/test class absent from train, or a
    patient in two splits; return the class names (sorted)."""
    labels = np.array([e.label for e in entries])
    names = sorted({e.label for e in entries})
    if len(names) < 2:
        raise DataError(f"{source}: found {len(names)} class(es) {names}; a classifier needs at "
                        f"least 2")
    for s in SPLITS:
        if not (splits == s).any():
            hint = (f"data.{s}_fraction={getattr(cfg, f'{s}_fraction')} of {len(entries)} images"
                    if s != "train" else "lower data.val_fraction/data.test_fraction")
            raise DataError(f"{source}: the {s} split would be empty ({hint}); add images or "
                            f"change the split")
    classes = sort_classes(labels[splits == "train"])
    for e, s in zip(entries, splits):
        if e.label not in classes:
            raise DataError(f"{source}: unknown label {e.label!r} ({e.where}, {s} split): the class "
                            f"has no image in the train split; known classes: {classes}")
    owner: dict[str, tuple[str, str]] = {}
    for e, s in zip(entries, splits):
        if e.group is not None:
            prev = owner.setdefault(e.group, (s, e.where))
            if prev[0] != s:
                raise DataError(f"{source}: patient {e.group!r} is in both the {prev[0]} split "
                                f"({prev[1]}) and the {s} split ({e.where})")
    return classes


def plan(entries: list[Entry], cfg: DataConfig, seed: int, root: Path, source: str,
         run_dir: Optional[Path]) -> tuple[list[Entry], np.ndarray, list[str], Optional[Path], bool]:
    """Assign (or reuse) the split, check it, save splits.csv -> (entries, splits, classes, file, reused)."""
    file = Path(run_dir) / SPLIT_FILE if run_dir is not None else None
    reused = file is not None and file.is_file()
    if reused:
        entries, splits = reuse_splits(entries, file, root)
    else:
        splits = assign_splits(entries, cfg, seed)
    classes = check_splits(entries, splits, cfg, source)
    if file is not None and not reused:
        write_splits(file, [(e.path, e.label, s) for e, s in zip(entries, splits)], root)
    return entries, splits, classes, file, reused


def read_split(entries: list[Entry], classes: list[str], cfg: DataConfig, desc: str) -> Split:
    """Read the images of one split into memory (threads; a progress bar above 500 files)."""
    n = len(entries)
    images = torch.empty((n, cfg.channels, cfg.image_size, cfg.image_size), dtype=torch.float32)

    def load(i):
        images[i] = torch.from_numpy(read_image(entries[i].path, cfg.image_size, cfg.channels))

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=n, desc=f"reading {desc} images", disable=n <= PROGRESS_ABOVE) as bar:
        for _ in pool.map(load, range(n)):
            bar.update(1)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[e.label] for e in entries], dtype=torch.int64)
    return Split(images, labels, [str(e.path) for e in entries])


def fingerprint(entries: list[Entry], root: Path, extra: Optional[Path] = None) -> str:
    """sha256 over the sorted (relative path, size) list, plus the bytes of `extra` (a manifest)."""
    h = hashlib.sha256()
    if extra is not None:
        h.update(extra.read_bytes())
    for p in sorted(e.path for e in entries):
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            rel = str(p)
        h.update(f"{rel}\t{p.stat().st_size}\n".encode())
    return h.hexdigest()
