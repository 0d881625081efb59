"""Denoiser backbones: shapes, hooks, soft class conditioning, presets, errors."""

import pytest
import torch

from dcube.config import DiffusionConfig
from dcube.diffusion import (
    PRESETS,
    Denoiser,
    SoftClassEmbedding,
    UNetDenoiser,
    UViT,
    auto_patch_size,
    build_denoiser,
    build_from_spec,
    describe,
)

NUM_CLASSES = 3
SIZE = 8

# tiny configurations (fractions of a second per forward pass)
TINY = {
    "unet": lambda c, s=SIZE: UNetDenoiser(
        c, s, NUM_CLASSES, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
        num_head_channels=8, norm_num_groups=8,
    ),
    "uvit": lambda c, s=SIZE: UViT(c, s, NUM_CLASSES, embed_dim=32, depth=3, num_heads=2, patch_size=2),
}


def _jitter(model: torch.nn.Module, seed: int = 0) -> None:
    """Perturb every parameter: MONAI zero-initialises the output conv, which would make
    the output (and every gradient through it) identically zero at initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _inputs(n, c, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x, t, y


def _labels(kind, y):
    return y if kind == "hard" else torch.nn.functional.one_hot(y, NUM_CLASSES).float()


@pytest.mark.parametrize("backbone", ["unet", "uvit"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_equals_input(backbone, kind, channels):
    torch.manual_seed(0)
    model = TINY[backbone](channels)
    assert isinstance(model, Denoiser) and model.num_classes == NUM_CLASSES
    x, t, y = _inputs(4, channels)
    out = model(x, t, _labels(kind, y))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backbone", ["unet", "uvit"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_every_block_hooked_and_mapped(backbone, kind):
    torch.manual_seed(0)
    model = TINY[backbone](1)
    mods = model.feature_modules()
    assert list(mods) == model.feature_names
    assert model.mid_name in model.feature_names
    assert len(set(model.feature_names)) == len(model.feature_names)
    fired = []
    maps = {}

    def make_hook(name):
        def hook(_m, _inp, out):
            fired.append(name)
            maps[name] = model.to_map(name, out)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in mods.items()]
    x, t, y = _inputs(2, 1)
    model(x, t, _labels(kind, y))
    for h in handles:
        h.remove()
    assert fired == model.feature_names  # each block once, in forward order
    for name, fmap in maps.items():
        assert fmap.ndim == 4 and fmap.shape[0] == 2, name
    shapes = model.feature_shapes()
    assert list(shapes) == model.feature_names
    assert all(shapes[n] == tuple(maps[n].shape[1:]) for n in model.feature_names)
    with pytest.raises(KeyError, match="valid names"):
        model.to_map("nope", maps[model.mid_name])


def test_expected_feature_names():
    assert TINY["uvit"](1).feature_names == ["in_0", "mid", "out_0"]
    assert TINY["unet"](1).feature_names == ["down_0", "down_1", "mid", "up_0", "up_1"]
    uvit = UViT(1, 28, 2, embed_dim=32, depth=7, num_heads=2)
    assert uvit.feature_names == ["in_0", "in_1", "in_2", "mid", "out_0", "out_1", "out_2"]
    assert uvit.feature_shapes()["in_0"] == (32, 14, 14)  # 28 px, auto patch 2


@pytest.mark.parametrize("backbone", ["unet", "uvit"])
def test_one_hot_soft_labels_equal_hard_labels(backbone):
    torch.manual_seed(0)
    model = TINY[backbone](1).eval()
    _jitter(model)
    x, t, y = _inputs(5, 1)
    with torch.no_grad():
        hard = model(x, t, y)
        soft = model(x, t, _labels("soft", y))
        other = model(x, t, (y + 1) % NUM_CLASSES)
    torch.testing.assert_close(soft, hard, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other, hard)  # the class actually conditions the output


@pytest.mark.parametrize("backbone", ["unet", "uvit"])
def test_gradient_reaches_soft_labels_through_frozen_model(backbone):
    torch.manual_seed(0)
    model = TINY[backbone](1)
    _jitter(model)
    model.requires_grad_(False)
    x, t, _ = _inputs(4, 1)
    logits = torch.zeros(4, NUM_CLASSES, requires_grad=True)
    out = model(x, t, logits.softmax(dim=1))
    (out - x).pow(2).mean().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backbone", ["unet", "uvit"])
def test_null_class_scalar_t_and_bad_inputs(backbone):
    model = TINY[backbone](1)
    assert model.null_index == NUM_CLASSES == model.class_embedding.null_index
    assert model.class_embedding.num_embeddings == NUM_CLASSES + 1
    x, t, y = _inputs(2, 1)
    null = torch.full((2,), model.null_index)
    assert model(x, torch.tensor(10), null).shape == x.shape
    assert model(x, t, model.uniform_labels(2)).shape == x.shape
    with pytest.raises(ValueError, match="soft labels"):
        model(x, t, torch.rand(2, NUM_CLASSES + 2))
    with pytest.raises(ValueError, match="class ids"):
        model(x, t, y[:1])
    with pytest.raises(ValueError, match="t must"):
        model(x, t[:1], y)
    with pytest.raises(ValueError, match="x must"):
        model(x[:, 0], t, y)


def test_soft_class_embedding():
    emb = SoftClassEmbedding.for_classes(4, 6)
    assert emb.num_embeddings == 5 and emb.null_index == 4
    y = torch.tensor([0, 3, 4])
    torch.testing.assert_close(emb(y), emb.weight[y])
    p = torch.softmax(torch.randn(3, 4), dim=1)
    torch.testing.assert_close(emb(p), p @ emb.weight[:4])
    p5 = torch.nn.functional.one_hot(y, 5).float()  # mass on the null row too
    torch.testing.assert_close(emb(p5), emb.weight[y])
    with pytest.raises(ValueError, match="K=6"):
        emb(torch.rand(3, 6))
    copy = SoftClassEmbedding.from_embedding(torch.nn.Embedding(5, 6), num_classes=4)
    assert copy.null_index == 4


@pytest.mark.parametrize("backbone", ["unet", "uvit"])
def test_presets_build_and_report_parameter_counts(backbone):
    counts = {}
    for preset in PRESETS[backbone]:
        model = build_denoiser(DiffusionConfig(backbone=backbone, preset=preset), 1, 28, 2)
        info = describe(model)
        assert info["backbone"] == backbone and info["preset"] == preset
        assert info["mid_name"] == model.mid_name and info["feature_names"] == model.feature_names
        counts[preset] = info["params"]
    assert counts["tiny"] < counts["small"] < counts["base"]
    assert 0.5e6 < counts["tiny"] < 3e6


@pytest.mark.parametrize("backbone", ["unet", "uvit"])
def test_rebuild_from_spec(backbone):
    torch.manual_seed(0)
    model = build_denoiser(DiffusionConfig(backbone=backbone, preset="tiny"), 1, 28, 2).eval()
    _jitter(model)
    clone = build_from_spec(model.spec).eval()
    clone.load_state_dict(model.state_dict())
    x, t, y = _inputs(2, 1, size=28)
    with torch.no_grad():
        torch.testing.assert_close(clone(x, t, y), model(x, t, y))


def test_wrong_image_size_raises_clear_error():
    for backbone in ("unet", "uvit"):
        with pytest.raises(ValueError, match="image_size"):
            build_denoiser(DiffusionConfig(backbone=backbone, preset="tiny"), 1, 27, 2)
    with pytest.raises(ValueError, match="image_size=30 is not divisible by 4"):
        build_denoiser(DiffusionConfig(backbone="unet", preset="tiny"), 1, 30, 2)
    with pytest.raises(ValueError, match="image_size=30 is not divisible by patch_size=4"):
        UViT(1, 30, 2, embed_dim=32, depth=3, num_heads=2, patch_size=4)
    model = TINY["uvit"](1)
    with pytest.raises(ValueError, match="image_size=8"):
        model(torch.randn(1, 1, 12, 12), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_auto_patch_rule():
    assert [auto_patch_size(s) for s in (8, 28, 32, 64, 128, 224)] == [2, 2, 2, 4, 8, 16]


def test_unknown_backbone_or_preset():
    with pytest.raises(ValueError, match=r"diffusion.preset: 'huge'.*tiny.*small.*base"):
        build_denoiser(DiffusionConfig(backbone="uvit", preset="huge"), 1, 28, 2)
    with pytest.raises(ValueError, match="diffusion.backbone"):
        build_denoiser(DiffusionConfig(backbone="dit", preset="tiny"), 1, 28, 2)
