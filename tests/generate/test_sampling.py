import pytest
import torch

from dcube.config import DiffusionConfig
from dcube.diffusion import build_denoiser
from dcube.diffusion.embedding import SoftClassEmbedding
from dcube.diffusion.guidance import drop_labels, guided_eps
from dcube.diffusion.sampling import sample_images
from dcube.diffusion.schedule import ddim_scheduler
from dcube.diffusion.trainer import load_denoiser, train_diffusion

from .conftest import MICRO, toy_images

CFG = DiffusionConfig(**MICRO)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_denoiser(CFG, 1, 8, 2).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # MONAI zero-initialises the output layer: make the predictions non-trivial
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def test_ddim_is_deterministic_for_a_seed_and_batch_size_independent(model):
    labels = torch.tensor([0, 1, 1, 0, 1])
    kw = dict(steps=4, progress=False)
    a = sample_images(model, CFG, labels, seed=3, batch_size=2, **kw)
    again = sample_images(model, CFG, labels, seed=3, batch_size=2, **kw)
    b = sample_images(model, CFG, labels, seed=3, batch_size=5, **kw)
    c = sample_images(model, CFG, labels, seed=4, batch_size=5, **kw)
    assert a.shape == (5, 1, 8, 8) and torch.equal(a, again)
    assert torch.allclose(a, b, atol=1e-5)  # same noise per image; only float summation order differs
    assert not torch.allclose(a, c, atol=1e-2)
    assert a.min() >= -1 and a.max() <= 1


def test_ddpm_ancestral_runs_every_timestep_deterministically(model):
    labels = torch.tensor([0, 1])
    a = sample_images(model, CFG, labels, sampler="ddpm", seed=1, progress=False)
    b = sample_images(model, CFG, labels, sampler="ddpm", seed=1, progress=False)
    c = sample_images(model, CFG, labels, sampler="ddpm", seed=2, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.abs().max() <= 1
    with pytest.raises(ValueError, match="all 20 steps"):
        sample_images(model, CFG, labels, sampler="ddpm", steps=5, progress=False)


@pytest.mark.parametrize("kw, msg", [(dict(sampler="euler"), "sampler"), (dict(steps=0), "steps"),
                                     (dict(guidance=-1.0), "guidance"), (dict(batch_size=0), "batch_size")])
def test_bad_arguments_are_named(model, kw, msg):
    with pytest.raises(ValueError, match=msg):
        sample_images(model, CFG, torch.tensor([0]), progress=False, **kw)


def test_labels_must_be_real_class_ids(model):
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        sample_images(model, CFG, torch.tensor([0, 2]), progress=False)  # 2 = the null class
    with pytest.raises(ValueError, match="int64"):
        sample_images(model, CFG, torch.tensor([0.5]), progress=False)


def test_guidance_zero_is_the_plain_conditional_ddim_loop(model):
    labels = torch.tensor([1, 0, 1])
    got = sample_images(model, CFG, labels, steps=3, seed=0, guidance=0.0, progress=False)
    sched = ddim_scheduler(CFG, 3)
    x = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in sched.timesteps:
            x, _ = sched.step(model(x, torch.full((3,), int(t)), labels), int(t), x)
    assert torch.allclose(got, x.clamp(-1, 1), atol=1e-6)


def test_guided_eps_mixes_conditional_and_null_predictions(model):
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([5, 9, 19]), torch.tensor([0, 1, 1])
    with torch.no_grad():
        eps_c = model(x, t, y)
        eps_u = model(x, t, torch.full((3,), model.null_index))
        got = guided_eps(model, x, t, y, 2.0)
    assert torch.allclose(got, eps_c + 2.0 * (eps_c - eps_u), atol=1e-5)
    assert not torch.allclose(got, eps_c)


def test_drop_labels_uses_the_null_column_and_spares_the_first_rows():
    cond = torch.nn.functional.one_hot(torch.arange(1000) % 3, 3).float()
    out = drop_labels(cond, 0.3, torch.Generator().manual_seed(0), start=100)
    assert out.shape == (1000, 4)
    dropped = out[:, 3] == 1
    assert not dropped[:100].any() and 0.25 < dropped[100:].float().mean() < 0.35
    assert torch.equal(out[dropped].sum(1), torch.ones(int(dropped.sum())))
    assert torch.equal(out[~dropped, :3], cond[~dropped])
    with pytest.raises(ValueError, match="class_dropout"):
        drop_labels(cond, 1.0, torch.Generator())


def _null_row(model):
    emb = next(m for m in model.modules() if isinstance(m, SoftClassEmbedding))
    return emb.weight[emb.null_index].detach().clone()


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_training_learns_the_null_class_only_with_class_dropout(tmp_path, p):
    images, labels = toy_images([8, 8])
    cfg = DiffusionConfig(**{**MICRO, "epochs": 3, "max_steps": 5, "ema_decay": 0.0}, class_dropout=p, contrastive_weight=0.0)
    torch.manual_seed(0)
    init = _null_row(build_denoiser(cfg, 1, 8, 2))
    torch.manual_seed(0)
    model, loaded = load_denoiser(train_diffusion(cfg, images, labels, 2, tmp_path, seed=0))
    assert loaded.class_dropout == p
    assert torch.equal(_null_row(model), init) == (p == 0.0)


def test_cfg_sampling_from_a_class_dropout_checkpoint(checkpoint):
    model, cfg = load_denoiser(checkpoint)
    labels = torch.tensor([0, 1])
    plain = sample_images(model, cfg, labels, steps=3, guidance=0.0, progress=False)
    guided = sample_images(model, cfg, labels, steps=3, guidance=3.0, progress=False)
    again = sample_images(model, cfg, labels, steps=3, guidance=3.0, progress=False)
    assert torch.equal(guided, again) and not torch.equal(plain, guided)
