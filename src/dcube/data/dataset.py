"""``load_data``: dispatch on ``cfg.source``, apply the seeded stratified caps, record provenance."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dcube.config import DataConfig
from dcube.data.bundle import SPLITS, DataBundle, DataError, Split
from dcube.data.fetch import resolve_npz
from dcube.data.files import fingerprint, plan, raise_unreadable, read_split, save_plan
from dcube.data.folder import absolute, read_manifest, scan_folder
from dcube.data.images import array_to_tensor
from dcube.data.medmnist import file_size_for, get_info
from dcube.data.npz import load_npz
from dcube.data.splits import stratified_subsample
from dcube.utils.io import sha256_file


def _check_cfg(cfg: DataConfig) -> None:
    if cfg.source not in ("medmnist", "folder", "csv"):
        raise DataError(f"data.source: {cfg.source!r} is not one of ['medmnist', 'folder', 'csv']")
    if cfg.channels not in (1, 3):
        raise DataError(f"data.channels: {cfg.channels!r} is not 1 or 3")
    if cfg.image_size <= 0:
        raise DataError(f"data.image_size: must be > 0, got {cfg.image_size}")
    for s in SPLITS:
        cap = getattr(cfg, f"max_{s}")
        if cap is not None and cap <= 0:
            raise DataError(f"data.max_{s}: must be > 0 or null, got {cap}")
    if cfg.minority_ratio is not None and not 0 < cfg.minority_ratio <= 1:
        raise DataError(f"data.minority_ratio: must lie in (0, 1], got {cfg.minority_ratio}")
    if cfg.source != "medmnist" and not cfg.path:
        raise DataError(f"data.path: required when data.source is {cfg.source!r}")


def _cap(labels: np.ndarray, cfg: DataConfig, split: str, seed: int) -> np.ndarray:
    """Indices kept under data.max_<split> (seeded, stratified; all when no cap)."""
    cap = getattr(cfg, f"max_{split}")
    keep = np.arange(len(labels)) if cap is None else stratified_subsample(labels, cap, [seed, SPLITS.index(split)])
    if split == "train" and cfg.minority_ratio is not None:
        keep = keep[_cut_minority(labels[keep], cfg.minority_ratio, seed)]
    return keep


def _cut_minority(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Indices kept when the smallest class is cut to ``ratio`` x the largest (seeded)."""
    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    small = present[np.argmin(counts[present])]
    target = max(1, int(round(ratio * counts.max())))
    members = np.flatnonzero(labels == small)
    if target >= len(members):
        return np.arange(len(labels))
    dropped = np.random.default_rng([seed, 99]).permutation(members)[target:]
    return np.setdiff1d(np.arange(len(labels)), dropped)


def _class_counts(split: Split, classes: list[str]) -> dict:
    counts = torch.bincount(split.labels, minlength=len(classes)).tolist()
    return {c: int(n) for c, n in zip(classes, counts)}


def load_data(cfg: DataConfig, seed: int, run_dir: Optional[Path] = None) -> DataBundle:
    """Load train/val/test as float32 (N, C, S, S) tensors in [-1, 1] with int64 labels.

    MedMNIST keeps its official split; folders/CSVs are split here (seeded, stratified,
    grouped by patient_id when given) and the split is saved to / reused from
    ``run_dir/splits.csv``. `seed` draws the split and the caps unless ``cfg.split_seed`` is set. Every check runs before a tensor is returned.
    """
    _check_cfg(cfg)
    if cfg.split_seed is not None:  # one split (and caps) shared by runs with different seeds
        seed = cfg.split_seed
    if cfg.source == "medmnist":
        return _load_medmnist(cfg, seed)
    path = Path(cfg.path).expanduser()
    if cfg.source == "folder":
        entries, layout = scan_folder(path)
        root, manifest = absolute(path), None
    else:
        entries, layout = read_manifest(path, cfg.allow_outside_root), "csv"
        root, manifest = absolute(path).parent, path
    sha = fingerprint(entries, root, manifest)
    entries, splits, classes, file, reused, grouping = plan(entries, cfg, seed, root, str(path), run_dir)
    labels = np.array([classes.index(e.label) for e in entries])
    out, before, rest, errors = {}, {}, None, []
    for s in SPLITS:  # every file is read before any error is raised: all bad files in one message
        members = np.flatnonzero(splits == s)
        before[s] = len(members)
        keep = members[_cap(labels[members], cfg, s, seed)]
        out[s] = read_split([entries[i] for i in keep], classes, cfg, s, errors)
        if s == "train" and cfg.unlabelled_rest:
            left = np.setdiff1d(members, keep)
            rest = read_split([entries[i] for i in left], classes, cfg, "unlabelled", errors) if len(left) else None
    raise_unreadable(errors)
    save_plan(file, entries, splits, root, reused)  # only now: a rerun after removing bad files just works
    info = {"source": cfg.source, "path": str(absolute(path)), "layout": layout, "sha256": sha,
            "split_file": str(file) if file else None, "split_reused": reused, "grouping": grouping or None}
    return _with_unlabelled(_bundle(out, classes, cfg, info, before), cfg, rest)


def _load_medmnist(cfg: DataConfig, seed: int) -> DataBundle:
    info = get_info(cfg.name)
    size = file_size_for(cfg.image_size)
    path = resolve_npz(info, size, cfg.path, cfg.download)
    explicit = bool(cfg.path) and Path(cfg.path).expanduser().is_file()
    arrays = load_npz(path, info, None if explicit else size)
    if info.channels > cfg.channels:
        warnings.warn(f"{info.name} is RGB; converting it to grayscale (data.channels=1)",
                      stacklevel=3)
    out, before, rest = {}, {}, None
    for s in SPLITS:
        images, labels = arrays[s]
        before[s] = len(labels)
        keep = _cap(labels, cfg, s, seed)
        out[s] = Split(array_to_tensor(images[keep], cfg.image_size, cfg.channels),
                       torch.from_numpy(labels[keep]).to(torch.int64),
                       [f"{path.name}:{s}:{int(i)}" for i in keep])
        if s == "train" and cfg.unlabelled_rest:
            left = np.setdiff1d(np.arange(len(labels)), keep)
            rest = Split(array_to_tensor(images[left], cfg.image_size, cfg.channels),
                         torch.from_numpy(labels[left]).to(torch.int64),
                         [f"{path.name}:{s}:{int(i)}" for i in left]) if len(left) else None
    meta = {"source": "medmnist", "name": info.name, "path": str(absolute(path)),
            "file_image_size": int(arrays["train"][0].shape[1]), "sha256": sha256_file(path)}
    return _with_unlabelled(_bundle(out, list(info.labels), cfg, meta, before), cfg, rest)


def _with_unlabelled(bundle: DataBundle, cfg: DataConfig, rest: Split | None) -> DataBundle:
    """Attach the step-1-only unlabelled images: the training rest (labels dropped) and data.unlabelled."""
    from dcube.data.unlabelled import load_unlabelled

    parts, ids, info = [], [], {}
    if rest is not None:
        parts.append(rest.images)
        ids += rest.ids
        info["training_rest"] = len(rest)
    if cfg.unlabelled:
        images, more = load_unlabelled(cfg.unlabelled, cfg.image_size, cfg.channels)
        parts.append(images)
        ids += more
        info["source"] = {"path": str(Path(cfg.unlabelled).expanduser().resolve()), "n": len(more)}
    if parts:
        bundle.unlabelled, bundle.unlabelled_ids = torch.cat(parts), ids
        bundle.info["unlabelled"] = {"n": len(ids), **info}
    return bundle


def _bundle(out: dict, classes: list[str], cfg: DataConfig, meta: dict, before: dict) -> DataBundle:
    meta.update({
        "image_size": cfg.image_size, "channels": cfg.channels, "class_names": list(classes),
        "split_sizes": {s: len(out[s]) for s in SPLITS},
        "split_sizes_before_caps": dict(before),
        "class_counts": {s: _class_counts(out[s], classes) for s in SPLITS},
    })
    return DataBundle(out["train"], out["val"], out["test"], list(classes), meta)
