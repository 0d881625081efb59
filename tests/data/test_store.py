"""The on-disk image store and row reads (dcube.data.store, dcube.utils.rows): what RAM would hold, bit for bit."""

import numpy as np
import pytest
import torch

from dcube.config import DataConfig
from dcube.data import load_data
from dcube.data.store import ImageWriter, open_images
from dcube.features.cache import FeatureWriter, load_features, save_features
from dcube.utils.rows import Concat, DiskRows, batches, is_on_disk


def _bmnist(shared_data, **kw):
    return DataConfig(name="breastmnist", path=str(shared_data / "medmnist" / "breastmnist.npz"), download=False, **kw)


def test_streamed_medmnist_splits_equal_the_in_memory_ones(shared_data, tmp_path):
    ram = load_data(_bmnist(shared_data), 0)
    disk = load_data(_bmnist(shared_data, in_memory_mb=0), 0, tmp_path)
    idx = torch.tensor([5, 0, 1, 2, 70, 69, 3])  # runs and jumps
    for s in ("train", "val", "test"):
        a, b = ram.split(s).images, disk.split(s).images
        assert isinstance(a, torch.Tensor) and isinstance(b, DiskRows) and b.shape == a.shape
        assert torch.equal(a, b[:]) and torch.equal(a[idx], b[idx]) and torch.equal(a[7], b[7])
        assert torch.equal(a.flip(-1)[idx], b.flip(-1)[idx])
        assert ram.split(s).ids == disk.split(s).ids and torch.equal(ram.split(s).labels, disk.split(s).labels)
    assert len(list((tmp_path / "cache" / "images").glob("*.u8"))) == 3
    # a second load reuses the store (no decode): the file is not rewritten
    f = next((tmp_path / "cache" / "images").glob("train-*.u8"))
    before = f.stat().st_mtime_ns
    load_data(_bmnist(shared_data, in_memory_mb=0), 0, tmp_path)
    assert f.stat().st_mtime_ns == before


def test_streamed_folder_split_equals_in_memory_and_a_bad_file_leaves_no_store(tmp_path):
    from PIL import Image

    g = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(g.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    cfg = dict(source="folder", path=str(tmp_path / "data"), image_size=16)
    ram = load_data(DataConfig(**cfg), 0, tmp_path / "r1")
    disk = load_data(DataConfig(**cfg, in_memory_mb=0), 0, tmp_path / "r2")
    assert torch.equal(ram.train.images, disk.train.images[:])  # 8-bit PNGs at their own size: exact
    (tmp_path / "data" / "a" / "bad.png").write_bytes(b"not a png")
    from dcube.data.bundle import DataError

    with pytest.raises(DataError, match="bad.png"):
        load_data(DataConfig(**cfg, in_memory_mb=0), 0, tmp_path / "r3")
    assert not list((tmp_path / "r3").rglob("*.u8*"))  # nothing half-written


def test_unlabelled_images_stream_too_and_a_bad_one_leaves_no_store(shared_data, tmp_path):
    """data.unlabelled (a folder and an .npz) goes to the store like the splits: the same pixels as in RAM;
    an unreadable unlabelled file stops the load with its name and leaves no store."""
    from PIL import Image

    from dcube.data.bundle import DataError

    g = np.random.default_rng(1)
    (tmp_path / "unl").mkdir()
    for i in range(10):
        Image.fromarray(g.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "unl" / f"{i}.png")
    np.savez(tmp_path / "unl.npz", images=g.integers(0, 256, (9, 28, 28), dtype=np.uint8))
    for src, n in ((tmp_path / "unl", 10), (tmp_path / "unl.npz", 9)):
        kw = dict(max_train=40, max_val=10, max_test=10, unlabelled=str(src))
        ram = load_data(_bmnist(shared_data, **kw), 0, tmp_path / f"r-{src.name}")
        disk = load_data(_bmnist(shared_data, in_memory_mb=0, **kw), 0, tmp_path / f"d-{src.name}")
        assert isinstance(ram.unlabelled, torch.Tensor) and is_on_disk(disk.unlabelled)
        assert len(disk.unlabelled) == n and torch.equal(ram.unlabelled, disk.unlabelled[:])
        assert list((tmp_path / f"d-{src.name}" / "cache" / "images").glob("unlabelled-extra-*.u8"))
    (tmp_path / "unl" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        load_data(_bmnist(shared_data, in_memory_mb=0, unlabelled=str(tmp_path / "unl")), 0, tmp_path / "bad")
    assert not list((tmp_path / "bad").rglob("unlabelled-extra-*"))


def test_a_store_with_another_key_is_not_reused_and_a_killed_write_is_invisible(tmp_path):
    w = ImageWriter(tmp_path / "s.u8", (3, 1, 4, 4), {"k": 1})
    w.write(0, torch.zeros(3, 1, 4, 4))
    assert open_images(tmp_path / "s.u8", {"k": 1}) is None  # not closed: not there
    rows = w.close()
    assert open_images(tmp_path / "s.u8", {"k": 2}) is None
    assert torch.equal(open_images(tmp_path / "s.u8", {"k": 1})[:], rows[:])
    with pytest.raises(IndexError):
        rows[torch.tensor([3])]


def test_feature_writer_file_reads_back_like_save_features(tmp_path):
    g = torch.Generator().manual_seed(0)
    maps = {"mid": torch.randn(10, 5, 4, 4, generator=g), "up_0": torch.randn(10, 3, 8, 8, generator=g) * 30}
    ref = save_features(tmp_path / "ref.safetensors", maps, {"n": 10})
    w = FeatureWriter(tmp_path / "f.safetensors", 10, {"n": 10})
    for s in (6, 0, 3):  # blocks in any order
        w.write(s, {n: m[s:s + 3 if s < 6 else 10] for n, m in maps.items()})
    w.close()
    a = load_features(ref, ["mid", "up_0"], {"n": 10})
    b = load_features(tmp_path / "f.safetensors", ["mid", "up_0"], {"n": 10})  # safetensors' own loader
    d = load_features(tmp_path / "f.safetensors", ["mid", "up_0"], {"n": 10}, disk=True)
    for n in maps:
        assert torch.equal(a[n], b[n]) and torch.equal(d[n][:].float(), a[n]) and d[n].dtype == torch.float16
        assert torch.equal(d[n][torch.tensor([9, 2, 3])].float(), a[n][[9, 2, 3]])
    assert load_features(tmp_path / "f.safetensors", ["mid"], {"n": 11}, disk=True) is None


def test_concat_and_dataloader_batches_equal_plain_indexing(shared_data, tmp_path):
    disk = load_data(_bmnist(shared_data, in_memory_mb=0), 0, tmp_path)
    ram = load_data(_bmnist(shared_data), 0)
    both = Concat([disk.train.images, ram.val.images])
    ref = torch.cat([ram.train.images, ram.val.images])
    idx = torch.randperm(len(ref), generator=torch.Generator().manual_seed(1))[:50]
    assert torch.equal(both[idx], ref[idx])
    index = [idx[k:k + 16] % len(disk.train) for k in range(0, 50, 16)]
    for w in (0, 2):  # DataLoader worker processes: the same batches in the same order
        got = list(batches(disk.train.images, index, workers=w))
        assert all(torch.equal(x, ram.train.images[i]) for x, i in zip(got, index))
