"""The run's ``splits.csv`` (path,label,split): written once, reused so a resumed run keeps its split."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from dcube.data.bundle import SPLITS, DataError
from dcube.data.folder import absolute
from dcube.utils.io import atomic_write_text

SPLIT_FILE = "splits.csv"


def relative(path: Path, root: Path) -> str:
    """`path` relative to `root` (POSIX style) when below it, else absolute."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def write_splits(file: Path, rows: list[tuple[Path, str, str]], root: Path) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "split"])
    w.writerows((relative(p, root), label, split) for p, label, split in rows)
    return atomic_write_text(file, buf.getvalue())


def read_splits(file: Path, root: Path) -> dict[Path, tuple[str, str]]:
    """{absolute path: (label, split)}; relative paths are taken relative to `root`."""
    out: dict[Path, tuple[str, str]] = {}
    with open(file, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label", "split"} <= set(reader.fieldnames):
            raise DataError(f"{file}: expected the columns path,label,split, got {reader.fieldnames}")
        for row in reader:
            if row["split"] not in SPLITS:
                raise DataError(f"{file}:{reader.line_num}: split {row['split']!r} is not one of "
                                f"{list(SPLITS)}")
            out[absolute(root / row["path"])] = (row["label"], row["split"])
    return out
