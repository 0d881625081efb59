"""``load_data``: dispatch on ``cfg.source``, apply the seeded stratified caps, record provenance."""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dcube.config import ConfigError, DataConfig, validate_data
from dcube.data.bundle import SPLITS, DataBundle, DataError, Split
from dcube.data.fetch import resolve_npz
from dcube.data.files import fingerprint, plan, raise_unreadable, read_split, save_plan
from dcube.data.folder import absolute, read_manifest, scan_folder
from dcube.data.images import MAX_PIXELS
from dcube.data.medmnist import file_size_for, get_info
from dcube.data.npz import load_npz
from dcube.data.splits import nested_per_class, stratified_subsample
from dcube.utils import dist
from dcube.utils.io import sha256_file


def _cap(labels: np.ndarray, cfg: DataConfig, split: str, seed: int) -> np.ndarray:
    """Indices kept under data.max_<split> (seeded, stratified; all when no cap)."""
    cap = getattr(cfg, f"max_{split}")
    keep = np.arange(len(labels)) if cap is None else stratified_subsample(labels, cap, [seed, SPLITS.index(split)])
    if split == "train" and cfg.minority_ratio is not None:
        keep = keep[_cut_minority(labels[keep], cfg.minority_ratio, seed)]
    if split == "train" and cfg.labelled_per_class is not None:  # nested over k for one seed (learning curves)
        keep = keep[nested_per_class(labels[keep], cfg.labelled_per_class, [seed, 7])]
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


def on_disk(cfg: DataConfig, n: int) -> bool:
    """Whether a split of `n` images goes to the on-disk store (data.in_memory_mb, counted as float32)."""
    if cfg.in_memory_mb is None:
        return False
    return n * cfg.channels * cfg.image_size ** 2 * 4 > cfg.in_memory_mb * 2 ** 20


def _cache(cfg: DataConfig, run_dir: Optional[Path], split: str, members: list, data_sha: str
           ) -> Optional[tuple[Path, dict]]:
    """(path, key) of the split's on-disk store, or None when it stays in RAM. The key names everything the
    decoded pixels depend on: the data fingerprint, the split's members and the decoding settings."""
    if not members or not on_disk(cfg, len(members)):
        return None

    ids = hashlib.sha256("\n".join(str(getattr(e, "path", e)) for e in members).encode()).hexdigest()
    key = {"data": data_sha, "split": split, "members": ids, "image_size": cfg.image_size,
           "channels": cfg.channels, "dicom_window": cfg.dicom_window, "max_pixels": MAX_PIXELS}

    root = Path(run_dir) / "cache" / "images" if run_dir else Path(tempfile.gettempdir()) / "dcube-images"
    if not dist.is_main():  # several processes: files in the run directory come from rank 0 only
        root = Path(tempfile.gettempdir()) / "dcube-images" / f"rank{dist.rank()}-{data_sha[:12]}"
    return root / f"{split}-{ids[:16]}.u8", key


def _checked(cfg: DataConfig, seed: int) -> int:
    """Validate `cfg` (a DataConfig built in Python has not been through dcube.config.from_dict) -> the seed
    that draws the split and the caps."""
    try:
        validate_data(cfg)
    except ConfigError as exc:
        raise DataError(str(exc)) from exc
    return cfg.split_seed if cfg.split_seed is not None else seed  # split_seed: one split for every run seed


def _planned(cfg: DataConfig, seed: int, run_dir: Optional[Path]):
    """A folder's or CSV's files and their split -> (path, layout, root, fingerprint, files.plan's tuple)."""
    path = Path(cfg.path).expanduser()
    if cfg.source == "folder":
        entries, layout = scan_folder(path)
        root, manifest = absolute(path), None
    else:
        entries, layout = read_manifest(path), "csv"
        root, manifest = absolute(path).parent, path
    sha = fingerprint(entries, root, manifest)
    return path, layout, root, sha, plan(entries, cfg, seed, root, str(path), run_dir)


def split_labels(cfg: DataConfig, seed: int, split: str = "test") -> np.ndarray:
    """The int labels of one split in the order load_data(cfg, seed) returns it, without decoding a folder's
    or CSV's images (its split is planned exactly as load_data plans it, with no run directory): what a
    table needs to pair runs by their test images."""
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {list(SPLITS)}")
    seed = _checked(cfg, seed)
    if cfg.source == "medmnist":
        return getattr(_load_medmnist(cfg, seed, None), split).labels.numpy()
    *_, (entries, splits, classes, *_) = _planned(cfg, seed, None)
    members = np.flatnonzero(splits == split)
    labels = np.array([classes.index(entries[i].label) for i in members], dtype=np.int64)
    return labels[_cap(labels, cfg, split, seed)]


def load_data(cfg: DataConfig, seed: int, run_dir: Optional[Path] = None) -> DataBundle:
    """Load train/val/test as float32 (N, C, S, S) tensors in [-1, 1] with int64 labels.

    MedMNIST keeps its official split; folders/CSVs are split here (seeded, stratified,
    grouped by patient_id when given) and the split is saved to / reused from
    ``run_dir/splits.csv``. `seed` draws the split and the caps unless ``cfg.split_seed`` is set. Every check runs before a tensor is returned.
    """
    seed = _checked(cfg, seed)
    if cfg.source == "medmnist":
        return _load_medmnist(cfg, seed, run_dir)
    path, layout, root, sha, (entries, splits, classes, file, reused, grouping) = _planned(cfg, seed, run_dir)
    labels = np.array([classes.index(e.label) for e in entries])
    out, before, rest, errors = {}, {}, None, []
    for s in SPLITS:  # every file is read before any error is raised: all bad files in one message
        members = np.flatnonzero(splits == s)
        before[s] = len(members)
        keep = members[_cap(labels[members], cfg, s, seed)]
        chosen = [entries[i] for i in keep]
        out[s] = read_split(chosen, classes, cfg, s, errors, _cache(cfg, run_dir, s, chosen, sha))
        if s == "train" and cfg.unlabelled_rest:
            left = [entries[i] for i in np.setdiff1d(members, keep)]
            rest = read_split(left, classes, cfg, "unlabelled", errors,
                              _cache(cfg, run_dir, "unlabelled", left, sha)) if left else None
    try:
        raise_unreadable(errors)
    except DataError:  # no store of this failed pass is left behind: nothing half-written
        for split in [*out.values(), rest]:
            if split is not None and hasattr(split.images, "path"):
                for f in (split.images.path, split.images.path.with_name(split.images.path.name + ".json")):
                    f.unlink(missing_ok=True)
        raise
    save_plan(file, entries, splits, root, reused)  # only now: a rerun after removing bad files just works
    info = {"source": cfg.source, "path": str(absolute(path)), "layout": layout, "sha256": sha,
            "split_file": str(file) if file else None, "split_reused": reused, "grouping": grouping or None}
    return _with_unlabelled(_bundle(out, classes, cfg, info, before), cfg, rest, run_dir)


def _array_split(images: np.ndarray, labels: np.ndarray, keep: np.ndarray, cfg: DataConfig, split: str,
                 path: Path, run_dir: Optional[Path], sha: str) -> Split:
    """Rows `keep` of an in-memory array as a Split: a float32 tensor, or the on-disk store (converted
    in chunks, so no float32 copy of the split is ever made)."""
    from dcube.data.store import decode_array

    ids = [f"{path.name}:{split if split != 'unlabelled' else 'train'}:{int(i)}" for i in keep]
    y = torch.from_numpy(labels[keep]).to(torch.int64)
    return Split(decode_array(images, keep, cfg.image_size, cfg.channels, _cache(cfg, run_dir, split, ids, sha)), y, ids)


def _load_medmnist(cfg: DataConfig, seed: int, run_dir: Optional[Path] = None) -> DataBundle:
    info = get_info(cfg.name)
    size = file_size_for(cfg.image_size)
    path = resolve_npz(info, size, cfg.path, cfg.download)
    sha = sha256_file(path)
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
        out[s] = _array_split(images, labels, keep, cfg, s, path, run_dir, sha)
        if s == "train" and cfg.unlabelled_rest:
            left = np.setdiff1d(np.arange(len(labels)), keep)
            rest = _array_split(images, labels, left, cfg, "unlabelled", path, run_dir, sha) if len(left) else None
    meta = {"source": "medmnist", "name": info.name, "path": str(absolute(path)),
            "file_image_size": int(arrays["train"][0].shape[1]), "sha256": sha}
    return _with_unlabelled(_bundle(out, list(info.labels), cfg, meta, before), cfg, rest, run_dir)


def _with_unlabelled(bundle: DataBundle, cfg: DataConfig, rest: Split | None,
                     run_dir: Optional[Path] = None) -> DataBundle:
    """Attach the step-1-only unlabelled images: the training rest (labels dropped) and data.unlabelled."""
    from dcube.data.unlabelled import load_unlabelled

    parts, ids, info = [], [], {}
    if rest is not None:
        parts.append(rest.images)
        ids += rest.ids
        info["training_rest"] = len(rest)
    if cfg.unlabelled:
        images, more = load_unlabelled(cfg.unlabelled, cfg.image_size, cfg.channels,
                                       lambda members, sha: _cache(cfg, run_dir, "unlabelled-extra", members, sha))
        parts.append(images)
        ids += more
        info["source"] = {"path": str(Path(cfg.unlabelled).expanduser().resolve()), "n": len(more)}
    if parts:
        from dcube.data.store import cat_images

        bundle.unlabelled, bundle.unlabelled_ids = cat_images(parts), ids
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
