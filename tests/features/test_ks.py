"""The paper's Eq. 6 (features.ks_map rules): per image map against a Gaussian of its own moments."""

import numpy as np
import pytest
import torch

from dcube.features.ks import ks_map_scores, plot_pvalues, select_ks_map


def _maps(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    gaussian = torch.randn(n, 16, 4, 4, generator=g)  # pure noise
    # class-dependent bimodal channels: Gaussian within each image, bimodal across images
    sign = (labels * 2 - 1).float()[:, None, None, None]
    structured = 3 * sign + 0.2 * torch.randn(n, 16, 4, 4, generator=g)
    skewed = torch.randn(n, 8, 2, 2, generator=g).exp() ** 2  # heavy right tail
    return {"noise": gaussian, "structured": structured, "skewed": skewed}


def test_constant_layer_is_not_selected():
    maps = _maps()
    maps["dead"] = torch.zeros(256, 4, 2, 2)
    sel = select_ks_map(maps)
    assert "dead" not in sel.names and "skewed" in sel.names


def test_deterministic_and_plot(tmp_path):
    a, b = select_ks_map(_maps()), select_ks_map(_maps())
    assert a.pvalues == b.pvalues
    out = plot_pvalues(a, tmp_path / "ks.png")
    assert out.stat().st_size > 1000
    assert np.isfinite(list(a.statistics.values())).all()


def test_ks_map_false_positive_rate_on_gaussian_maps():
    """Truly Gaussian maps: per-image p-values are uniform (share below alpha ~ alpha) and a layer
    is called non-Gaussian at the nominal rate (the median-D test)."""
    g = torch.Generator().manual_seed(0)
    maps = {f"g{i}": torch.randn(40, 4, 4, 4, generator=g) for i in range(300)}
    sc = ks_map_scores(maps, alpha=0.05)
    per_image = np.mean([s["share"] for s in sc.values()])
    assert 0.035 < per_image < 0.065, per_image
    fpr = np.mean([s["pvalue"] < 0.05 for s in sc.values()])
    assert 0.02 <= fpr <= 0.08, fpr
    assert abs(np.mean([s["effect"] for s in sc.values()])) < 0.01


def test_ks_map_is_resolution_robust_where_pooling_is_not():
    """Skewed per-pixel values at 8x8 and 28x28: the same effect size (channel pooling, dcube's first
    rule, averaged the skew away at the higher resolution)."""
    dist = torch.distributions.Exponential(1.0)
    torch.manual_seed(0)
    lo = {"skew": dist.sample((64, 8, 8, 8)), "gauss": torch.randn(64, 8, 8, 8)}
    hi = {"skew": dist.sample((64, 8, 28, 28)), "gauss": torch.randn(64, 8, 28, 28)}
    a, b = ks_map_scores(lo), ks_map_scores(hi)
    assert abs(a["skew"]["effect"] - b["skew"]["effect"]) < 0.02
    assert a["skew"]["effect"] > 0.1 and abs(b["gauss"]["effect"]) < 0.01
    assert select_ks_map(lo).names == select_ks_map(hi).names == ["skew"]


def test_ks_map_is_deterministic_and_order_invariant():
    maps = _maps()
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    a = select_ks_map(maps)
    b = select_ks_map({k: v[perm] for k, v in maps.items()})
    assert a.names == b.names and a.statistics == pytest.approx(b.statistics) and a.method == "ks_map"
    # per image, "structured" is Gaussian (its bimodality is ACROSS images): Eq. 6 does not see it
    assert a.names == ["skewed"]


def test_ks_map_fallback_and_cap():
    g = torch.Generator().manual_seed(1)
    maps = {f"l{i}": torch.randn(32, 4, 4, 4, generator=g) for i in range(3)}
    sel = select_ks_map(maps, fallback_k=1)
    assert sel.fallback and len(sel.names) == 1 and "largest effect" in sel.note
    assert len(select_ks_map(_maps(), max_layers=1).names) == 1


def test_ks_map_most_gaussian_takes_the_other_end():
    """Table VI's ablation under Eq. 6: as many layers as the rule keeps, from the smallest effect."""
    dist = torch.distributions.Exponential(1.0)
    torch.manual_seed(0)
    maps = {"skew": dist.sample((48, 4, 8, 8)), "gauss_a": torch.randn(48, 4, 8, 8),
            "gauss_b": torch.randn(48, 4, 8, 8), "skew2": dist.sample((48, 4, 8, 8)) ** 2}
    best, worst = select_ks_map(maps), select_ks_map(maps, keep="most_gaussian")
    assert set(best.names) == {"skew", "skew2"}
    assert len(worst.names) == len(best.names) and not set(worst.names) & set(best.names)
    assert "MOST Gaussian" in worst.note and worst.method == "ks_map"
    with pytest.raises(ValueError, match="ks_keep"):
        select_ks_map(maps, keep="median")
