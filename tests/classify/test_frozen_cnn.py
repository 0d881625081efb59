"""classifier.cnn_frozen_blocks: the sub-feature CNN's first units frozen, their outputs cached once per split."""

import warnings

import pytest
import torch

import dcube.classify.trainer as trainer_mod
from dcube.classify.bn import recalibrate_bn
from dcube.classify.head import DCubeHead
from dcube.classify.trainer import FeatureSplit, train_classifier
from dcube.config import ClassifierConfig, ConfigError, from_dict


def _head(sub, k, size=8):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resnet18 is not pretrained here
        torch.manual_seed(0)
        return DCubeHead([4], 2, 1, size, ClassifierConfig(subfeature=sub, fuse_size=4, cnn_frozen_blocks=k))


def _bns(mods):
    return [m for mod in mods for m in mod.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("sub,k", [("resnet18", 2), ("efficientnet-lite0", 4)])
def test_frozen_part_gives_the_same_logits_and_never_changes(sub, k):
    head = _head(sub, k)
    feats, x = [torch.randn(6, 4, 4, 4)], torch.rand(6, 1, 8, 8) * 2 - 1
    frozen_mods = head.cnn.body.frozen_modules(k)
    assert frozen_mods and all(not p.requires_grad for m in frozen_mods for p in m.parameters())
    head.eval()
    assert torch.equal(head(feats, x), head(feats, x, head.cnn.frozen_features(x)))
    frozen_bn, live_bn = _bns(frozen_mods)[0], _bns([head.stages])[0]
    before, live_before = frozen_bn.running_mean.clone(), live_bn.running_mean.clone()
    head.train()
    assert not frozen_bn.training and live_bn.training
    head(feats, x).sum().backward()
    assert all(p.grad is None for m in frozen_mods for p in m.parameters())
    assert torch.equal(frozen_bn.running_mean, before)  # ImageNet statistics kept in training
    assert not torch.equal(live_bn.running_mean, live_before)
    n_all = len(_bns([head]))
    assert recalibrate_bn(head, [(feats, x, head.cnn.frozen_features(x))]) == n_all - len(_bns(frozen_mods))
    assert torch.equal(frozen_bn.running_mean, before)


def _split(n, seed, size=8):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    feats = [torch.randn(n, 4, 4, 4, generator=g) + y[:, None, None, None]]
    images = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    return FeatureSplit(feats, images, y, [f.flip(-1) for f in feats])


def test_cached_and_recomputed_frozen_part_train_identically(tmp_path, monkeypatch):
    cfg = ClassifierConfig(subfeature="resnet18", cnn_frozen_blocks=2, fuse_size=4, epochs=2, batch_size=16,
                           cycle_weight=0, consistency_batch=8, bn_recalibration=32)
    score = lambda y, p: (float(p[:, 1].mean()), 0.0)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached, _ = train_classifier(cfg, _split(40, 0), _split(16, 1), ["a", "b"], tmp_path / "a", score)
        monkeypatch.setattr(trainer_mod, "FROZEN_CACHE_BYTES", 0)  # every batch recomputes it
        recomputed, _ = train_classifier(cfg, _split(40, 0), _split(16, 1), ["a", "b"], tmp_path / "b", score)
        init = _head("resnet18", 2)
    a, b = cached.state_dict(), recomputed.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    start = init.state_dict()
    stem_keys = [k for k in a if k.startswith("cnn.body.conv1") or k.startswith("cnn.body.layer1")]
    later_keys = [k for k in a if k.startswith("cnn.body.layer3") and k.endswith("weight")]
    assert stem_keys and all(torch.equal(a[k], start[k]) for k in stem_keys)  # frozen: untouched by training
    assert any(not torch.equal(a[k], start[k]) for k in later_keys)  # the rest is fine-tuned


@pytest.mark.parametrize("sub,k", [("efficientnet-lite0", 12), ("resnet18", 4), ("none", 1), ("resnet18", -1)])
def test_out_of_range_frozen_blocks_name_the_field(sub, k):
    with pytest.raises(ConfigError, match="classifier.cnn_frozen_blocks"):
        from_dict({"classifier": {"subfeature": sub, "cnn_frozen_blocks": k}})
