"""Find a MedMNIST .npz file locally, or download it (temp file, MD5 check, atomic rename)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional
from urllib.request import urlopen

from dcube.data.bundle import DataError
from dcube.data.medmnist import MedMNISTInfo

ENV_DIR = "DCUBE_DATA_DIR"


def cache_dir() -> Path:
    return Path(os.path.expanduser("~")) / ".cache" / "dcube"


def candidate_paths(filename: str) -> list[Path]:
    """Where a MedMNIST file is looked for: $DCUBE_DATA_DIR/<file>, then ~/.cache/dcube/<file>."""
    paths = []
    if os.environ.get(ENV_DIR):
        paths.append(Path(os.environ[ENV_DIR]).expanduser() / filename)
    paths.append(cache_dir() / filename)
    return paths


def resolve_npz(info: MedMNISTInfo, size: int, path: Optional[str], download: bool) -> Path:
    """Return the local .npz for `info` at `size`, downloading it when allowed and absent."""
    filename = info.filename(size)
    if path:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        if not p.is_dir():
            raise DataError(f"data.path: {p} does not exist (expected a MedMNIST .npz file)")
        candidates = [p / filename]
    else:
        candidates = candidate_paths(filename)
    for c in candidates:
        if c.is_file():
            return c
    searched = ", ".join(str(c) for c in candidates)
    where = (f"Download {info.url(size)} and put it at {candidates[0]}"
             f" (or set {ENV_DIR} to the folder holding {filename}, or data.path to the file)")
    if not download:
        raise DataError(f"MedMNIST file {filename} not found; searched: {searched}. "
                        f"Downloading is off (data.download: false). {where}.")
    try:
        return download_file(info.url(size), candidates[0], info.md5_for(size))
    except (OSError, DataError) as exc:  # URLError is an OSError
        raise DataError(f"MedMNIST file {filename} not found (searched: {searched}) and could not "
                        f"be downloaded from {info.url(size)}: {exc}. {where}.") from exc


def download_file(url: str, dest: Path, md5: Optional[str]) -> Path:
    """Download `url` to `dest` atomically; raise DataError when the MD5 does not match."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            from tqdm.auto import tqdm

            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if md5 is None:
            warnings.warn(f"no MD5 known for {dest.name}; its integrity was not checked", stacklevel=2)
        elif digest.hexdigest() != md5:
            raise DataError(f"{url}: MD5 {digest.hexdigest()} does not match the expected {md5}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


