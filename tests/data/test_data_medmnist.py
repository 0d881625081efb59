"""MedMNIST: the table, loading the shared npz files, validation, and the not-found messages."""

import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dcube.config import DataConfig
from dcube.data import MEDMNIST, DataError, fetch, load_data

NAMES = {"pneumoniamnist", "breastmnist", "dermamnist", "bloodmnist", "octmnist", "retinamnist",
         "pathmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist"}
COUNTS = {  # from /work/shared/data/README.md
    "pneumoniamnist": {"train": (1214, 3494), "val": (135, 389), "test": (234, 390)},
    "breastmnist": {"train": (147, 399), "val": (21, 57), "test": (42, 114)},
}


def test_table():
    assert set(MEDMNIST) == NAMES
    for name, info in MEDMNIST.items():
        assert info.channels in (1, 3) and len(info.labels) >= 2
        assert set(info.counts) == {"train", "val", "test"}
        assert info.url(28) == f"https://zenodo.org/records/10519652/files/{name}.npz?download=1"
        assert info.url(128).endswith(f"/{name}_128.npz?download=1")
        for size in (28, 64, 128, 224):
            md5 = info.md5_for(size)
            assert md5 is None or re.fullmatch(r"[0-9a-f]{32}", md5)
    assert MEDMNIST["breastmnist"].labels == ("malignant", "normal, benign")


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_load_shared_npz(name, medmnist_dir, monkeypatch):
    monkeypatch.setenv("DCUBE_DATA_DIR", str(medmnist_dir))
    b = load_data(DataConfig(name=name), seed=0)
    assert b.class_names == list(MEDMNIST[name].labels)
    assert b.info["path"] == os.path.abspath(medmnist_dir / f"{name}.npz")
    assert b.info["sha256"] == hashlib.sha256((medmnist_dir / f"{name}.npz").read_bytes()).hexdigest()
    for s in ("train", "val", "test"):
        sp = b.split(s)
        n = sum(COUNTS[name][s])
        assert sp.images.shape == (n, 1, 28, 28) and sp.images.dtype == torch.float32
        assert sp.labels.shape == (n,) and sp.labels.dtype == torch.int64
        assert len(sp.ids) == n and sp.ids[0] == f"{name}.npz:{s}:0"
        assert sp.images.min() >= -1 and sp.images.max() <= 1
        assert sp.images.min() < -0.9 and sp.images.max() > 0.9  # uses the whole range
        assert tuple(torch.bincount(sp.labels).tolist()) == COUNTS[name][s]
        assert b.info["class_counts"][s] == dict(zip(b.class_names, COUNTS[name][s]))


def test_explicit_path_resize_and_caps(medmnist_dir):
    cfg = DataConfig(name="pneumoniamnist", path=str(medmnist_dir / "pneumoniamnist.npz"),
                     image_size=64, channels=3, max_train=400, max_val=50, max_test=60)
    b = load_data(cfg, seed=3)
    assert b.train.images.shape == (400, 3, 64, 64)
    assert (len(b.val), len(b.test)) == (50, 60)
    assert torch.equal(b.train.images[:, 0], b.train.images[:, 2])  # gray replicated
    assert -1 <= b.train.images.min() and b.train.images.max() <= 1
    normal = int((b.train.labels == 0).sum())  # stratified: 1214/4708 of 400 = 103.1
    assert normal == 103
    again = load_data(cfg, seed=3)
    assert again.train.ids == b.train.ids and torch.equal(again.train.images, b.train.images)
    assert load_data(cfg, seed=4).train.ids != b.train.ids
    assert b.info["split_sizes"] == {"train": 400, "val": 50, "test": 60}
    assert b.info["split_sizes_before_caps"] == {"train": 4708, "val": 524, "test": 624}


def _tampered(tmp_path, medmnist_dir, change) -> Path:
    d = dict(np.load(medmnist_dir / "breastmnist.npz"))
    change(d)
    out = tmp_path / "breastmnist.npz"
    np.savez(out, **d)
    return out


@pytest.mark.parametrize("change, key", [
    (lambda d: d.update(train_images=d["train_images"][:-1], train_labels=d["train_labels"][:-1]),
     "train_images"),
    (lambda d: d.update(val_images=np.zeros((78, 32, 32), np.uint8)), "val_images"),
    (lambda d: d.update(test_images=np.zeros((156, 28, 28, 3), np.uint8)), "test_images"),
    (lambda d: d.pop("val_labels"), "val_labels"),
    (lambda d: d.update(test_labels=d["test_labels"][:-1]), "test_labels"),
    (lambda d: d.update(train_labels=d["train_labels"] + 5), "train_labels"),
])
def test_tampered_npz_is_rejected(tmp_path, medmnist_dir, change, key):
    path = _tampered(tmp_path, medmnist_dir, change)
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="breastmnist", path=str(path)), seed=0)
    assert str(path) in str(err.value) and key in str(err.value)


def test_tampered_file_in_data_dir_is_rejected(tmp_path, medmnist_dir, monkeypatch):
    _tampered(tmp_path, medmnist_dir, lambda d: d.pop("train_images"))
    monkeypatch.setenv("DCUBE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="missing key 'train_images'"):
        load_data(DataConfig(name="breastmnist", download=False), seed=0)


def test_nan_images_are_rejected(tmp_path, medmnist_dir):
    def poison(d):
        x = d["val_images"].astype(np.float32)
        x[7, 3, 3] = np.nan
        d["val_images"] = x

    path = _tampered(tmp_path, medmnist_dir, poison)
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="breastmnist", path=str(path)), seed=0)
    msg = str(err.value)
    assert str(path) in msg and "'val'" in msg and "NaN" in msg and "index 7" in msg


def test_not_found_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("DCUBE_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="bloodmnist", image_size=64, download=False), seed=0)
    msg = str(err.value)
    assert str(tmp_path / "data" / "bloodmnist_64.npz") in msg
    assert str(Path.home() / ".cache" / "dcube" / "bloodmnist_64.npz") in msg
    assert "data.download" in msg and MEDMNIST["bloodmnist"].url(64) in msg


def test_not_found_and_download_fails(monkeypatch):
    calls = []

    def failing(url, dest, md5):
        calls.append((url, dest, md5))
        raise OSError("no route to host")

    monkeypatch.setattr(fetch, "download_file", failing)
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="pneumoniamnist", download=True), seed=0)
    cache = Path.home() / ".cache" / "dcube" / "pneumoniamnist.npz"
    assert calls == [(MEDMNIST["pneumoniamnist"].url(28), cache, MEDMNIST["pneumoniamnist"].md5_for(28))]
    msg = str(err.value)
    assert "no route to host" in msg and str(cache) in msg and "could not be downloaded" in msg


def test_missing_explicit_path(tmp_path):
    with pytest.raises(DataError, match="data.path"):
        load_data(DataConfig(path=str(tmp_path / "nope.npz")), seed=0)


def test_unknown_name():
    with pytest.raises(DataError, match="chestmnist"):
        load_data(DataConfig(name="chestmnist"), seed=0)


class _Response(io.BytesIO):
    headers = {}

    def __enter__(self):
        return self


def test_download_file_checks_md5_and_is_atomic(tmp_path, monkeypatch):
    payload = b"not really an npz"
    monkeypatch.setattr(fetch, "urlopen", lambda url, timeout: _Response(payload))
    dest = tmp_path / "x.npz"
    with pytest.raises(DataError, match="MD5"):
        fetch.download_file("http://example.invalid/x", dest, "0" * 32)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
    fetch.download_file("http://example.invalid/x", dest, hashlib.md5(payload).hexdigest())
    assert dest.read_bytes() == payload and list(tmp_path.iterdir()) == [dest]
    with pytest.warns(UserWarning, match="not checked"):
        fetch.download_file("http://example.invalid/x", tmp_path / "y.npz", None)


def test_download_url_error_leaves_nothing(tmp_path):
    with pytest.raises(OSError):  # the autouse fixture's urlopen refuses
        fetch.download_file("http://example.invalid/x", tmp_path / "x.npz", None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rescale, ok", [
    (lambda x: (x - x.mean()) / x.std(), False),  # z-scored: would become blank
    (lambda x: x / 127.5 - 1.0, False),  # [-1, 1]: would lose its dark half to clamping
    (lambda x: x / 255.0, True),  # [0, 1]
    (lambda x: x * 1.0, True),  # [0, 255] as float
])
def test_float_images_need_a_known_range(tmp_path, medmnist_dir, rescale, ok):
    def change(d):
        for s in ("train", "val", "test"):
            d[f"{s}_images"] = rescale(d[f"{s}_images"].astype(np.float32))

    path = _tampered(tmp_path, medmnist_dir, change)
    if ok:
        b = load_data(DataConfig(name="breastmnist", path=str(path)), seed=0)
        ref = load_data(DataConfig(name="breastmnist", path=str(medmnist_dir / "breastmnist.npz")), seed=0)
        assert (b.train.images - ref.train.images).abs().max() < 1e-5
        return
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="breastmnist", path=str(path)), seed=0)
    msg = str(err.value)
    assert str(path) in msg and "[0, 1] or [0, 255]" in msg and "span [-" in msg, msg
