"""Image-file entries -> a checked train/val/test assignment -> a DataBundle of tensors."""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections import Counter
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
from dcube.utils.io import sha256_file

MIN_CLASS_IMAGES = 2  # without a given split, a class with fewer images is an error (a mistyped label?)
PROGRESS_ABOVE = 500  # show a progress bar when reading more files than this


MAX_LISTED = 20  # unreadable files named in one error


def check_labels(entries: list[Entry], cfg: DataConfig, source: str, split_given: bool) -> None:
    """Labels that look like mistakes: names equal up to case and spaces; with no given split, a class
    under MIN_CLASS_IMAGES images; with data.classes, any other name."""
    names = sorted({e.label for e in entries})
    if cfg.classes is not None:
        expected = [str(c) for c in cfg.classes]
        other = [n for n in names if n not in expected]
        if other:
            first = next(e for e in entries if e.label == other[0])
            raise DataError(f"{source}: label {other[0]!r} ({first.where}) is not in data.classes {expected}")
    folded: dict[str, str] = {}
    for n in names:
        key = " ".join(n.split()).casefold()
        if key in folded:
            raise DataError(f"{source}: labels {folded[key]!r} and {n!r} differ only in case or spaces; "
                            f"make them one class (or list both in data.classes)")
        folded[key] = n
    if not split_given and cfg.classes is None:
        counts = {n: sum(e.label == n for e in entries) for n in names}
        for n, c in counts.items():
            if c < MIN_CLASS_IMAGES:
                first = next(e for e in entries if e.label == n)
                raise DataError(f"{source}: class {n!r} has only {c} image(s) ({first.where}), fewer than "
                                f"{MIN_CLASS_IMAGES}: a typo? Fix the label, or list the classes in data.classes")


def content_hashes(entries: list[Entry]) -> list[str]:
    """A key per file that is equal exactly for byte-identical files: the sha256 of its bytes when another
    file has its size (threads), else the size alone, so a file without a same-size twin is not read."""

    sizes = [e.path.stat().st_size for e in entries]
    twins = Counter(sizes)
    todo = [i for i, n in enumerate(sizes) if twins[n] > 1]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = dict(zip(todo, pool.map(lambda i: sha256_file(entries[i].path), todo)))
    return [digests.get(i, f"size:{n}") for i, n in enumerate(sizes)]


NEAR_SIZE, NEAR_RMS = 16, 8.0  # data.duplicates=near: 16x16 grey thumbnails within 8 grey levels RMS


_LAST_THUMBS: dict = {}  # the last folder's thumbnails: a process that splits one folder for several seeds reads it once


def thumbnails(entries: list[Entry], cfg: DataConfig) -> tuple[np.ndarray, list[int]]:
    """(n, NEAR_SIZE**2) float64 grey levels in [0, 255] of every readable entry, and the rows that could not be
    read (left NaN: the data stage names them when it reads the images). Reused within a process while every
    file keeps its path, size and modification time."""
    from tqdm.auto import tqdm

    stats = [e.path.stat() for e in entries]
    key = (cfg.dicom_window, tuple((str(e.path), st.st_size, st.st_mtime_ns) for e, st in zip(entries, stats)))
    if _LAST_THUMBS.get("key") == key:
        return _LAST_THUMBS["thumbs"].copy(), list(_LAST_THUMBS["bad"])

    def one(e):
        try:
            x = read_image(e.path, NEAR_SIZE, 1, dicom_window=cfg.dicom_window)
            return (x.reshape(-1).astype(np.float64) + 1.0) * 127.5
        except Exception:  # unreadable: reported with every other unreadable file by the data stage
            return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        rows = list(tqdm(pool.map(one, entries), total=len(entries), desc="near-duplicate thumbnails",
                         disable=len(entries) <= PROGRESS_ABOVE, leave=False))
    bad = [i for i, r in enumerate(rows) if r is None]
    out = np.full((len(entries), NEAR_SIZE * NEAR_SIZE), np.nan)
    for i, r in enumerate(rows):
        if r is not None:
            out[i] = r
    _LAST_THUMBS.update(key=key, thumbs=out.copy(), bad=list(bad))
    return out, bad


def near_pairs(thumbs: np.ndarray, tol: float = NEAR_RMS, block: int = 1024) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of rows whose RMS difference is < tol; NaN rows pair with nothing. Only rows
    whose means differ by less than tol are compared (|mean difference| <= RMS difference), in blocks
    along the sorted means: near-linear for ordinary image sets. Written here: no library offers it."""
    ok = np.flatnonzero(~np.isnan(thumbs).any(axis=1))
    t = thumbs[ok]
    order = np.argsort(t.mean(axis=1), kind="stable")
    t, ids = t[order], ok[order]
    means, sq, d = t.mean(axis=1), (t ** 2).sum(axis=1), t.shape[1]
    pairs = []
    for a in range(0, len(t), block):
        b = min(a + block, len(t))
        end = int(np.searchsorted(means, means[b - 1] + tol, side="left"))
        for c in range(a, end, 4 * block):
            e = min(c + 4 * block, end)
            d2 = (sq[a:b, None] + sq[None, c:e] - 2.0 * t[a:b] @ t[c:e].T) / d
            ii, jj = np.nonzero(d2 < tol * tol)
            for i, j in zip(ii + a, jj + c):
                if j > i and means[j] - means[i] < tol:
                    pairs.append((int(min(ids[i], ids[j])), int(max(ids[i], ids[j]))))
    return sorted(pairs)


def split_groups(entries: list[Entry], cfg: DataConfig) -> tuple[np.ndarray, dict]:
    """One group id per entry: the CSV's patient_id, or data.group_pattern's match on the file name, else
    the file itself; copies (data.duplicates: byte-identical files, and with 'near' re-encoded or resaved
    ones) are merged into one group (union-find) so they share a split."""
    n = len(entries)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i, j):
        parent[find(i)] = find(j)

    by_key: dict[str, int] = {}
    pattern = re.compile(cfg.group_pattern) if cfg.group_pattern else None
    unmatched = []
    for i, e in enumerate(entries):
        key = e.group
        if key is None and pattern is not None:
            m = pattern.search(e.path.name)
            if m is None:
                unmatched.append(e)
            else:
                key = m.group(1) if m.groups() else m.group(0)
        if key is not None:
            union(i, by_key.setdefault(f"g:{key}", i))
    if unmatched:
        raise DataError(f"data.group_pattern {cfg.group_pattern!r} does not match {len(unmatched)} file name(s), "
                        f"e.g. {unmatched[0].path.name}; fix the pattern")
    first: dict[str, int] = {}
    dup_groups, dup_files, conflicts = set(), 0, []
    for i, h in enumerate(content_hashes(entries) if cfg.duplicates != "off" else []):
        j = first.setdefault(h, i)
        if j != i:
            dup_files += 1
            dup_groups.add(h)
            if entries[i].label != entries[j].label:
                conflicts.append((entries[j], entries[i]))
            union(i, j)
    near: dict = {}
    if cfg.duplicates == "near":
        thumbs, _ = thumbnails(entries, cfg)
        pairs = [(i, j) for i, j in near_pairs(thumbs) if find(i) != find(j)]  # not already byte-identical twins
        for i, j in pairs:
            if entries[i].label != entries[j].label:
                conflicts.append((entries[i], entries[j]))
            union(i, j)
        members: dict[int, list[int]] = {}
        for i, j in pairs:
            for k in (i, j):
                members.setdefault(find(k), []).append(k)
        groups = [sorted({str(entries[k].path) for k in ks}) for ks in members.values()]
        near = {"near_duplicate_pairs": len(pairs), "near_duplicate_groups": sorted(groups),
                "near_rule": f"{NEAR_SIZE}x{NEAR_SIZE} grey thumbnails within {NEAR_RMS:g} grey levels RMS"}
    if conflicts:
        a, b = conflicts[0]
        warnings.warn(f"{len(conflicts)} identical or near-identical image pair(s) carry different labels, e.g. {a.path} "
                      f"({a.label}) and {b.path} ({b.label}); they are kept in one split", stacklevel=3)
    roots = [find(i) for i in range(n)]
    info = {"duplicate_groups": len(dup_groups), "duplicate_files": dup_files, "label_conflicts": len(conflicts),
            "groups": len(set(roots)), "group_pattern": cfg.group_pattern, "duplicates": cfg.duplicates, **near}
    return np.array([str(r) for r in roots]), info


def assign_splits(entries: list[Entry], cfg: DataConfig, seed: int) -> tuple[np.ndarray, dict]:
    """Predefined splits are kept; otherwise a seeded stratified split in which every group (patient,
    data.group_pattern, byte-identical copies) lands in one split. Without any group of more than one
    file this is the plain stratified split. A predefined layout without val or test gets it carved out
    of train. Returns the splits and what the grouping found."""
    labels = np.array([e.label for e in entries])
    given = np.array([e.split or "" for e in entries], dtype="<U5")
    info: dict = {}
    if all(given) and set(given) >= set(SPLITS):
        return given, info
    idx_all = np.arange(len(entries)) if not all(given) else np.flatnonzero(given == "train")
    groups, info = split_groups([entries[i] for i in idx_all], cfg)
    by_id = dict(zip(idx_all.tolist(), groups))
    explicit = all(e.group is not None for e in entries) or cfg.group_pattern is not None

    def split(idx, val, test):
        g = np.array([by_id[i] for i in idx])
        if explicit:
            return grouped_split(labels[idx], g, val, test, seed)
        # byte-identical copies only: split one representative per group, its copies follow it
        _, rep, inv = np.unique(g, return_index=True, return_inverse=True)
        rep_sorted = np.sort(rep)
        out_rep = stratified_split(labels[idx][rep_sorted], val, test, seed)
        where = {int(r): s for r, s in zip(rep_sorted, out_rep)}
        return np.array([where[int(rep[k])] for k in inv], dtype="<U5")

    if not all(given):
        return split(np.arange(len(entries)), cfg.val_fraction, cfg.test_fraction), info
    present = set(given)
    if "train" in present:
        tr = np.flatnonzero(given == "train")
        given[tr] = split(tr, 0.0 if "val" in present else cfg.val_fraction,
                          0.0 if "test" in present else cfg.test_fraction)
    return given, info


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


def check_splits(entries: list[Entry], splits: np.ndarray, cfg: DataConfig, source: str,
                 computed: bool = True) -> list[str]:
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
    train_labels = labels[splits == "train"]
    classes = sort_classes(train_labels)
    if cfg.classes is not None:
        missing = [str(c) for c in cfg.classes if str(c) not in classes]
        if missing:
            raise DataError(f"{source}: data.classes {missing} have no training image")
        classes = [str(c) for c in cfg.classes]
    for c in classes if computed else ():  # a split dcube drew: each class keeps >= 2 training images
        n = int((train_labels == c).sum())
        if n < 2:
            raise DataError(f"{source}: class {c!r} keeps {n} training image(s) after the split; a class needs at "
                            f"least 2 (add images, or lower data.val_fraction / data.test_fraction)")
        absent = [s for s in ("val", "test") if getattr(cfg, f"{s}_fraction") > 0
                  and not ((labels == c) & (splits == s)).any()]
        # grouping (copies, patients) can put a whole class in training: no score for it then. (A class too small
        # for the fractions to give it an evaluation image is the small-data case, allowed as before.)
        if len(absent) == 2 and (labels == c).sum() * max(cfg.val_fraction, cfg.test_fraction) >= 1:
            raise DataError(f"{source}: class {c!r} has no image in the {' and '.join(absent)} split{'s' * (len(absent) > 1)}: its "
                            f"{int((labels == c).sum())} images form too few groups (copies of one another, or "
                            f"one patient) to be split; add images, or check data.duplicates / data.group_pattern")
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
         run_dir: Optional[Path]) -> tuple[list[Entry], np.ndarray, list[str], Optional[Path], bool, dict]:
    """Assign (or reuse) the split and check it -> (entries, splits, classes, file, reused, grouping info).
    splits.csv is not written here: :func:`save_plan` writes it once every image has been read."""
    file = Path(run_dir) / SPLIT_FILE if run_dir is not None else None
    reused = file is not None and file.is_file()
    info: dict = {}
    split_given = all(e.split for e in entries)
    all_given = split_given and {e.split for e in entries} >= set(SPLITS)
    check_labels(entries, cfg, source, split_given)
    if reused:
        entries, splits = reuse_splits(entries, file, root)
    else:
        splits, info = assign_splits(entries, cfg, seed)
    classes = check_splits(entries, splits, cfg, source, computed=not (all_given or reused))
    return entries, splits, classes, file, reused, info


def save_plan(file: Optional[Path], entries: list[Entry], splits: np.ndarray, root: Path, reused: bool) -> None:
    if file is not None and not reused:
        write_splits(file, [(e.path, e.label, s) for e, s in zip(entries, splits)], root)


def raise_unreadable(errors: list[DataError]) -> None:
    """One DataError listing the first MAX_LISTED unreadable files and how many there are."""
    if not errors:
        return
    if len(errors) == 1:
        raise errors[0]
    shown = "; ".join(str(e) for e in errors[:MAX_LISTED])
    more = f"; and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
    raise DataError(f"{len(errors)} image files cannot be used (fix or remove them, then run again): {shown}{more}")


def read_split(entries: list[Entry], classes: list[str], cfg: DataConfig, desc: str,
               errors: Optional[list] = None, cache: Optional[tuple[Path, dict]] = None) -> Split:
    """Read the images of one split into memory (threads; a progress bar above 500 files). With `errors`,
    an unreadable file is appended to it (and its row left zero) instead of stopping the pass.
    With `cache` = (path, key) the images go to an on-disk uint8 store instead (dcube.data.store), reused
    when its key matches; a pass with an unreadable file leaves no store behind."""
    from tqdm.auto import tqdm

    from dcube.data.store import decode

    n = len(entries)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[e.label] for e in entries], dtype=torch.int64)
    shape = (n, cfg.channels, cfg.image_size, cfg.image_size)
    failed: list[tuple[int, DataError]] = []

    def fill(write) -> bool:
        def load(i):
            try:
                x = read_image(entries[i].path, cfg.image_size, cfg.channels, dicom_window=cfg.dicom_window)
            except DataError as exc:
                if errors is None:
                    raise
                x = np.zeros(shape[1:], dtype=np.float32)
                failed.append((i, exc))
            write(i, x[None])

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
                tqdm(total=n, desc=f"reading {desc} images", disable=n <= PROGRESS_ABOVE) as bar:
            for _ in pool.map(load, range(n)):
                bar.update(1)
        return not failed  # a pass that ends in an error (raise_unreadable) leaves no store that looks finished

    images = decode(shape, cache, fill)
    if errors is not None:
        errors += [e for _, e in sorted(failed, key=lambda t: t[0])]
    if images is None:
        images = torch.zeros((0, *shape[1:]))
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
