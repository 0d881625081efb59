import pytest
import torch

from dcube.features.ks import select_layers
from dcube.features.probe import select_by_probe


def _maps(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    # informative but Gaussian-looking: a small class shift under unit noise
    informative = 0.9 * y.float()[:, None, None, None] + torch.randn(n, 8, 2, 2, generator=g)
    skewed = torch.randn(n, 8, 2, 2, generator=g).exp() ** 2  # far from Gaussian, unrelated to y
    noise = torch.randn(n, 8, 2, 2, generator=g)
    return {"informative": informative, "skewed": skewed, "noise": noise}, y


def test_probe_keeps_the_predictive_layer_that_ks_rejects():
    maps, y = _maps()
    ks = select_layers(maps, alpha=0.05)
    assert "informative" not in ks.names and "skewed" in ks.names
    sel = select_by_probe(maps, y, k=1, folds=3, seed=0)
    assert sel.names == ["informative"] and sel.method == "probe"
    assert sel.probe_scores["informative"] > 0.75 > sel.probe_scores["skewed"]
    assert set(sel.pvalues) == set(maps)  # the KS report is kept alongside
    assert select_by_probe(maps, y, k=1, folds=3, seed=0).names == sel.names  # deterministic


def test_probe_needs_two_classes():
    maps, y = _maps(64)
    with pytest.raises(ValueError, match="single class"):
        select_by_probe(maps, torch.zeros_like(y), k=1)
