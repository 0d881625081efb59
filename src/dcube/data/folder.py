"""Scan image folders and CSV manifests into a list of entries (path, label[, split][, group]).

Layouts: ``root/<class>/*`` (split later), ``root/{train,val,test}/<class>/*`` (predefined; a
missing val or test folder is carved out of train, by data.val_fraction / test_fraction of it), and a CSV manifest with columns
``path,label[,split][,patient_id]``. Files are found recursively below each class folder;
hidden files and files without an image suffix are ignored.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dcube.data.bundle import DataError
from dcube.data.images import IMAGE_SUFFIXES

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}  # compared in lower case


@dataclass
class Entry:
    path: Path  # absolute
    label: str  # class name
    split: Optional[str] = None  # "train" | "val" | "test" when predefined
    group: Optional[str] = None  # patient id (CSV manifests)
    where: str = ""  # for messages: "<csv>:<line>" or the class folder


def absolute(path: str | Path) -> Path:
    """Absolute and normalised, without resolving symlinks (ids keep the names the user sees)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def sort_classes(names) -> list[str]:
    """Alphabetical; numerically when every name is an integer ('2' before '10')."""
    names = sorted({str(n) for n in names})
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return names


def _visible_dirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


# what a file's first bytes say it is, for files whose name has no image suffix (e.g. DICOM's IM0001)
_SIGNATURES = ((0, b"\x89PNG\r\n\x1a\n"), (0, b"\xff\xd8\xff"), (0, b"GIF87a"), (0, b"GIF89a"), (0, b"BM"),
               (0, b"II*\x00"), (0, b"MM\x00*"), (128, b"DICM"))


def looks_like_image(path: Path) -> bool:
    """Whether `path` starts like a PNG, JPEG, GIF, BMP, TIFF or DICOM file, whatever its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return any(head[at:at + len(sig)] == sig for at, sig in _SIGNATURES)


def _image_files(d: Path) -> list[Path]:
    """Files with an image suffix, and files without one that are images by content; any other file is
    named in a warning as skipped (hidden files and folders are ignored silently)."""
    found = [p for p in d.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts)]
    files, skipped = [], []
    for p in sorted(found):
        (files if p.suffix.lower() in IMAGE_SUFFIXES or looks_like_image(p) else skipped).append(p)
    if skipped:
        warnings.warn(f"{d}: {len(skipped)} file(s) that are not images are skipped, e.g. {skipped[0].name}",
                      stacklevel=3)
    for f in files:
        check_name(f)
    return files


def check_name(path: Path) -> None:
    """A file name that is not valid UTF-8 (undecodable bytes) cannot go into splits.csv or a report."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{os.fsencode(path)!r}: the file name is not valid UTF-8; rename the file") from None


def _nested_layout(root: Path, dirs: list[Path]) -> None:
    """Refuse root/<X>/<class>/... where the X are not split names dcube knows: it would become an
    'X' classifier. Recognised when every top folder holds only folders, and they share names."""
    subs = []
    for d in dirs:
        inner = _visible_dirs(d)
        if not inner or any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir()):
            return
        subs.append({p.name for p in inner})
    shared = set.intersection(*subs) if len(subs) > 1 else set()
    if shared:
        raise DataError(
            f"image folder {root}: every folder in it ({', '.join(d.name for d in dirs)}) holds the same class "
            f"folders ({', '.join(sorted(shared)[:5])}): a split/<class>/ layout whose split names are not "
            f"known. Rename them to train, val and test (also accepted: training, valid, validation, testing), "
            f"or point data.path at one of them")


def _class_entries(d: Path, split: Optional[str]) -> list[Entry]:
    out = []
    for cdir in _visible_dirs(d):
        files = _image_files(cdir)
        if not files:
            raise DataError(f"class folder {cdir} holds no image files "
                            f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        out += [Entry(absolute(f), cdir.name, split, None, str(cdir)) for f in files]
    loose = [p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        warnings.warn(f"{d}: {len(loose)} image file(s) outside any class folder are ignored, "
                      f"e.g. {loose[0].name}", stacklevel=3)
    return out


def scan_folder(root: str | Path) -> tuple[list[Entry], str]:
    """Entries of an image folder and its layout: 'classes' or 'predefined'."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data.path: image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder (data.source is 'folder')")
    dirs = _visible_dirs(root)
    subdirs = {p.name.lower(): p for p in dirs}
    known = [SPLIT_ALIASES[n] for n in subdirs if n in SPLIT_ALIASES]
    other = [d.name for d in dirs if d.name.lower() not in SPLIT_ALIASES]
    if "train" in known and other:
        splits = [d.name for d in dirs if d.name.lower() in SPLIT_ALIASES]
        raise DataError(f"image folder {root} mixes split folders ({', '.join(splits)}) with other folders "
                        f"({', '.join(other[:5])}); use root/<class>/<image> or root/{{train,val,test}}/<class>/<image>")
    if "train" in known and set(subdirs) <= set(SPLIT_ALIASES):
        if len(known) != len(set(known)):
            raise DataError(f"image folder {root}: two folders name the same split "
                            f"({', '.join(d.name for d in dirs)}); keep one of each")
        entries = []
        for name, d in subdirs.items():
            found = _class_entries(d, SPLIT_ALIASES[name])
            if not found:
                raise DataError(f"split folder {d} holds no class folders")
            entries += found
        return entries, "predefined"
    if not subdirs:
        raise DataError(f"image folder {root} holds no class folders; expected root/<class>/<image> "
                        f"or root/{{train,val,test}}/<class>/<image>")
    _nested_layout(root, dirs)
    return _class_entries(root, None), "classes"


def read_manifest(csv_path: str | Path) -> list[Entry]:
    """Entries of a CSV manifest; relative paths are relative to the CSV's folder and must stay inside
    it (no '../..' out of it); absolute paths are taken as written."""
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise DataError(f"data.path: CSV manifest {csv_path} does not exist or is not a file")
    try:
        return _read_manifest(csv_path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the manifest as "
                        f"UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    except csv.Error as exc:
        raise DataError(f"{csv_path}: not a readable CSV file ({exc})") from None


def _read_manifest(csv_path: Path) -> list[Entry]:
    root = absolute(csv_path.parent)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [(c or "").strip().lower() for c in (reader.fieldnames or [])]
        missing = [c for c in ("path", "label") if c not in fields]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {missing}; the header must name "
                            f"path,label[,split][,patient_id], got {fields}")
        reader.fieldnames = fields
        entries, seen, absent = [], {}, []
        for row in reader:
            where = f"{csv_path}:{reader.line_num}"
            entries.append(_manifest_entry(row, csv_path.parent, where, "split" in fields,
                                           "patient_id" in fields))
            e = entries[-1]
            if not Path(row["path"].strip()).expanduser().is_absolute() \
                    and not e.path.is_relative_to(root):  # '../..' out of the manifest's folder
                raise DataError(f"{where}: the relative path {row['path'].strip()!r} leads outside the manifest's "
                                f"folder {root}; give an absolute path")
            if e.path in seen:
                raise DataError(f"{where}: image {e.path} is listed twice (also at {seen[e.path]})")
            seen[e.path] = where
            if not e.path.is_file():
                absent.append(e)
    if absent:
        raise DataError(f"{csv_path}: {len(absent)} listed image file(s) do not exist, e.g. "
                        f"{absent[0].path} ({absent[0].where})")
    if not entries:
        raise DataError(f"{csv_path}: the manifest lists no images")
    return entries


def _manifest_entry(row: dict, base: Path, where: str, has_split: bool, has_group: bool) -> Entry:
    def cell(name):
        return (row.get(name) or "").strip()

    path, label = cell("path"), cell("label")
    if not path:
        raise DataError(f"{where}: empty 'path'")
    if not label:
        raise DataError(f"{where}: empty 'label' for {path}")
    p = absolute(base / Path(path).expanduser())
    split = group = None
    if has_split:
        split = SPLIT_ALIASES.get(cell("split").lower())
        if split is None:
            raise DataError(f"{where}: split {cell('split')!r} is not one of train, val, test")
    if has_group:
        group = cell("patient_id")
        if not group:
            raise DataError(f"{where}: empty 'patient_id' for {path}")
    return Entry(p, label, split, group, where)
