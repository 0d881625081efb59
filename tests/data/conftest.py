"""Fixtures for the data-stage tests: no network, an empty HOME, tiny image folders."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No test may download: urlopen raises; HOME (~/.cache/dcube) is empty; no DCUBE_DATA_DIR."""

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in the tests")

    monkeypatch.setattr("dcube.data.fetch.urlopen", refuse)
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("DCUBE_DATA_DIR", raising=False)


@pytest.fixture
def medmnist_dir(shared_data) -> Path:
    return shared_data / "medmnist"


def _png(path: Path, seed: int, size: int = 8, mode: str = "L") -> None:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


@pytest.fixture
def write_png():
    """write_png(path, seed, size=8, mode='L'): a small random PNG."""
    return _png


@pytest.fixture
def make_folder():
    """make_folder(root, {"A": 30, "B": 70}) -> root/<class>/<class>_<i>.png, tiny random PNGs."""

    def make(root: Path, counts: dict, mode: str = "L") -> Path:
        for k, (cls, n) in enumerate(sorted(counts.items())):
            for i in range(n):
                _png(root / cls / f"{cls}_{i:03d}.png", 1000 * k + i, mode=mode)
        return root

    return make
