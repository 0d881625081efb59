import numpy as np
import pytest
import torch

from dcube.features.ks import plot_pvalues, select_layers


def _maps(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    gaussian = torch.randn(n, 16, 4, 4, generator=g)  # pure noise: pooled values stay Gaussian
    # structured: class-dependent bimodal channels, far from Gaussian after standardising
    sign = (labels * 2 - 1).float()[:, None, None, None]
    structured = 3 * sign + 0.2 * torch.randn(n, 16, 4, 4, generator=g)
    skewed = torch.randn(n, 8, 2, 2, generator=g).exp() ** 2  # heavy right tail
    return {"noise": gaussian, "structured": structured, "skewed": skewed}


def test_gaussian_layer_rejected_structured_kept():
    sel = select_layers(_maps(), alpha=0.05, n_values=1000)
    assert sel.pvalues["noise"] > 0.05
    assert sel.pvalues["structured"] < 1e-6 and sel.pvalues["skewed"] < 1e-6
    assert sel.names == ["structured", "skewed"]  # forward order kept
    assert not sel.fallback


def test_most_gaussian_ablation_takes_the_other_end():
    maps = _maps()
    maps["noise2"] = torch.randn(256, 16, 4, 4, generator=torch.Generator().manual_seed(5))
    best = select_layers(maps, alpha=0.05, n_values=1000)
    worst = select_layers(maps, alpha=0.05, n_values=1000, keep="most_gaussian")
    assert len(worst.names) == len(best.names) == 2
    assert set(worst.names) == {"noise", "noise2"} and "MOST Gaussian" in worst.note
    with pytest.raises(ValueError, match="ks_keep"):
        select_layers(maps, keep="random")


@pytest.mark.parametrize("k", [1, 2])
def test_fallback_keeps_k_least_gaussian(k):
    g = torch.Generator().manual_seed(1)
    maps = {f"l{i}": torch.randn(256, 16, 2, 2, generator=g) for i in range(3)}
    sel = select_layers(maps, alpha=1e-9, n_values=500, fallback_k=k)
    assert sel.fallback and len(sel.names) == k and "least Gaussian" in sel.note
    ranked = sorted(sel.pvalues, key=sel.pvalues.get)
    assert set(sel.names) == set(ranked[:k])


def test_max_layers_caps_by_smallest_p():
    sel = select_layers(_maps(), alpha=0.05, max_layers=1)
    assert len(sel.names) == 1
    assert sel.pvalues[sel.names[0]] == min(sel.pvalues.values())


def test_constant_layer_is_not_selected():
    maps = _maps()
    maps["dead"] = torch.zeros(256, 4, 2, 2)
    sel = select_layers(maps)
    assert "dead" not in sel.names and sel.pvalues["dead"] == 1.0


def test_deterministic_and_plot(tmp_path):
    a, b = select_layers(_maps()), select_layers(_maps())
    assert a.pvalues == b.pvalues
    out = plot_pvalues(a, tmp_path / "ks.png")
    assert out.stat().st_size > 1000
    assert np.isfinite(list(a.statistics.values())).all()


# -- ks_map: the paper's Eq. 6, per image ---------------------------------------------------------
from dcube.features.ks import ks_map_scores, select_ks_map  # noqa: E402


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
    """Skewed per-pixel values at 8x8 and 28x28: the same effect size; channel pooling (dcube's
    first rule) averages the skew away at the higher resolution and stops seeing it."""
    dist = torch.distributions.Exponential(1.0)
    torch.manual_seed(0)
    lo = {"skew": dist.sample((64, 8, 8, 8)), "gauss": torch.randn(64, 8, 8, 8)}
    hi = {"skew": dist.sample((64, 8, 28, 28)), "gauss": torch.randn(64, 8, 28, 28)}
    a, b = ks_map_scores(lo), ks_map_scores(hi)
    assert abs(a["skew"]["effect"] - b["skew"]["effect"]) < 0.02
    assert a["skew"]["effect"] > 0.1 and abs(b["gauss"]["effect"]) < 0.01
    assert select_ks_map(lo).names == select_ks_map(hi).names == ["skew"]
    assert select_layers(hi).pvalues["skew"] > 0.05  # the pooled rule misses it at 28x28


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
