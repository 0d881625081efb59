import pytest
import torch
from torch import nn

from dcube.evaluate.fidelity import FewSamplesWarning, build_extractor, fid_kid, format_fidelity, per_class_fidelity


def _images(n, seed=0, size=16):
    """Smooth blobs at random places (N, 1, size, size) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = torch.rand(n, 2, generator=g) * size
    r = 2 + torch.rand(n, generator=g) * 3
    d = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2
    return (torch.exp(-d / r[:, None, None] ** 2) * 2 - 1)[:, None]


@pytest.fixture(scope="module")
def extractor():
    return build_extractor("efficientnet-lite0", size=64)


def test_fid_is_zero_for_a_set_with_itself_and_grows_with_noise(extractor):
    x = _images(40)
    g = torch.Generator().manual_seed(1)
    labels = torch.zeros(40, dtype=torch.long)
    fids = []
    for sigma in (0.0, 0.2, 0.6):
        noisy = (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)
        with pytest.warns(FewSamplesWarning, match="fewer than the 1280"):
            rep = per_class_fidelity(x, labels, noisy, labels, ["only"], extractor, batch_size=40)
        fids.append(rep["per_class"]["only"]["fid"])
    assert fids[0] < 1e-3 * fids[1] + 1e-6
    assert fids[0] < fids[1] < fids[2]
    assert rep["extractor"] == "efficientnet-lite0" and not rep["comparable_to_inception_fid"]
    assert "efficientnet-lite0" in format_fidelity(rep) and "NOT comparable" in format_fidelity(rep)


class _Toy(nn.Module):
    name, description, num_features = "toy", "mean and std of the pixels", 2

    def forward(self, x):
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1)


def test_per_class_kid_and_fid_separate_the_classes():
    real = torch.cat([_images(30, 0), _images(30, 1) * 0.3])
    labels = torch.cat([torch.zeros(30), torch.ones(30)]).long()
    fake = torch.cat([_images(30, 2), _images(30, 3)])  # class 1 generated wrongly (full contrast)
    rep = per_class_fidelity(real, labels, fake, labels, ["a", "b"], _Toy())
    a, b = rep["per_class"]["a"], rep["per_class"]["b"]
    assert a["fid"] < b["fid"] and a["kid_mean"] < b["kid_mean"]
    assert a["n_real"] == 30 and "note" not in a  # 30 images > 2 features: no warning


def test_precomputed_real_features_give_the_same_report_and_a_mismatch_is_refused():
    from dcube.evaluate.fidelity import extract_features

    real = torch.cat([_images(30, 0), _images(30, 1) * 0.3])
    labels = torch.cat([torch.zeros(30), torch.ones(30)]).long()
    fake = torch.cat([_images(30, 2), _images(30, 3)])
    toy = _Toy()
    once = extract_features(toy, real)
    assert per_class_fidelity(real, labels, fake, labels, ["a", "b"], toy, real_features=once) == \
        per_class_fidelity(real, labels, fake, labels, ["a", "b"], toy)
    with pytest.raises(ValueError, match="real_features"):
        per_class_fidelity(real, labels, fake, labels, ["a", "b"], toy, real_features=once[:10])
    with pytest.raises(ValueError, match="real_features"):
        per_class_fidelity(real, labels, fake, labels, ["a", "b"], None, real_features=once)


def test_fid_kid_on_feature_tables():
    a = torch.randn(100, 8, generator=torch.Generator().manual_seed(0)).double()
    assert fid_kid(a, a)["fid"] < 1e-6
    assert fid_kid(a, a + 1.0)["fid"] == pytest.approx(8.0, rel=1e-3)  # a shift of 1 in 8 dimensions
    with pytest.raises(ValueError, match="at least 2"):
        fid_kid(a[:1], a)


def test_inception_needs_a_safetensors_file(tmp_path):
    with pytest.raises(ValueError, match="needs a .safetensors"):
        build_extractor("inception")
    (tmp_path / "w.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickles"):
        build_extractor("inception", tmp_path / "w.pth")
    with pytest.raises(ValueError, match="not one of"):
        build_extractor("vgg")
