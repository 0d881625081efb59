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
