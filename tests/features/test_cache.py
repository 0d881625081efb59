"""The feature cache: float16 on disk, memory-mapped back, keyed by what it was computed from."""

import torch

from dcube.features.cache import load_features, save_features
from dcube.utils.io import load_tensors, mmap_tensors, save_tensors


def test_memory_mapped_features_equal_the_stored_ones_and_never_write_back(tmp_path):
    g = torch.Generator().manual_seed(0)
    maps = {"mid": torch.randn(7, 5, 4, 4, generator=g), "up_0": torch.randn(7, 3, 8, 8, generator=g) * 30}
    path = save_features(tmp_path / "f.safetensors", maps, {"model": "abc", "n": 7})
    mm = load_features(path, ["mid", "up_0"], {"model": "abc", "n": 7}, mmap=True)
    ram = load_features(path, ["mid", "up_0"], {"model": "abc", "n": 7})
    for n in maps:
        assert mm[n].dtype == torch.float16 and mm[n].shape == maps[n].shape
        assert torch.equal(mm[n].float(), ram[n]) and torch.equal(ram[n], maps[n].half().float())
    before = path.read_bytes()
    mm["mid"][0] = 123.0  # copy-on-write: the file is untouched
    assert path.read_bytes() == before
    assert load_features(path, ["mid"], {"model": "other", "n": 7}, mmap=True) is None  # another key: recompute
    assert load_features(path, ["down_0"], {"model": "abc", "n": 7}, mmap=True) is None


def test_mmap_tensors_reads_what_save_tensors_wrote(tmp_path):
    t = {"a": torch.arange(12, dtype=torch.int64).reshape(3, 4), "b": torch.rand(2, 3), "empty": torch.zeros(0, 4)}
    p = save_tensors(tmp_path / "t.safetensors", t, {"x": 1})
    mm, meta = mmap_tensors(p)
    ref, ref_meta = load_tensors(p)
    assert meta == ref_meta == {"x": 1}
    assert all(torch.equal(mm[k], ref[k]) for k in t)
