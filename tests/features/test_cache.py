"""The feature cache: float16 on disk, read back by rows, keyed by what it was computed from."""

import pytest
import torch

from dcube.features.cache import FeatureWriter, load_features, save_features
from dcube.utils.io import disk_tensors, load_tensors, save_tensors


def test_disk_features_equal_the_stored_ones_and_are_read_only(tmp_path):
    g = torch.Generator().manual_seed(0)
    maps = {"mid": torch.randn(7, 5, 4, 4, generator=g), "up_0": torch.randn(7, 3, 8, 8, generator=g) * 30}
    path = save_features(tmp_path / "f.safetensors", maps, {"model": "abc", "n": 7})
    dk = load_features(path, ["mid", "up_0"], {"model": "abc", "n": 7}, disk=True)
    ram = load_features(path, ["mid", "up_0"], {"model": "abc", "n": 7})
    for n in maps:
        assert dk[n].dtype == torch.float16 and dk[n].shape == maps[n].shape
        assert torch.equal(dk[n][:].float(), ram[n]) and torch.equal(ram[n], maps[n].half().float())
    before = path.read_bytes()
    with pytest.raises(TypeError):
        dk["mid"][0] = 123.0  # no writes through the cache
    row = dk["mid"][0]
    row += 1  # a row read is a copy: the file is untouched
    assert path.read_bytes() == before
    assert load_features(path, ["mid"], {"model": "other", "n": 7}, disk=True) is None  # another key: recompute
    assert load_features(path, ["down_0"], {"model": "abc", "n": 7}, disk=True) is None


def test_disk_tensors_reads_what_save_tensors_wrote(tmp_path):
    t = {"a": torch.arange(12, dtype=torch.int64).reshape(3, 4), "b": torch.rand(2, 3), "empty": torch.zeros(0, 4)}
    p = save_tensors(tmp_path / "t.safetensors", t, {"x": 1})
    dk, meta = disk_tensors(p)
    ref, ref_meta = load_tensors(p)
    assert meta == ref_meta == {"x": 1}
    assert all(torch.equal(dk[k][:], ref[k]) for k in t)


def test_a_new_feature_file_removes_what_a_killed_writer_left(tmp_path):
    stale = tmp_path / "train.safetensors.tmp4242"  # a writer SIGKILLed mid-split leaves its temporary file
    stale.write_bytes(b"x" * 1000)
    other = tmp_path / "val.safetensors.tmp4242"  # another split's: not this writer's to remove
    other.write_bytes(b"x")
    w = FeatureWriter(tmp_path / "train.safetensors", 2, {"n": 2})
    w.write(0, {"mid": torch.ones(2, 3, 4, 4)})
    path = w.close()
    assert not stale.exists() and other.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "train.safetensors", "val.safetensors.tmp4242"]
    assert torch.equal(load_features(path, ["mid"], {"n": 2})["mid"], torch.ones(2, 3, 4, 4))
