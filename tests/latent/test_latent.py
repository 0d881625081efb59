"""Latent diffusion: autoencoder round trip, zero-shot classifier, error maps, analysis, heads, CLI."""

import argparse
import json
import math

import pytest
import torch

from dcube.config import DiffusionConfig, LatentConfig, apply_overrides, from_dict
from dcube.diffusion.zeroshot import (
    Adaptive,
    ZeroShotOptions,
    classify_zero_shot,
    combine,
    make_trials,
    spread_order,
)
from dcube.latent.autoencoder import (
    LATENT_CHANNELS,
    LatentCodec,
    ae_spec,
    build_autoencoder,
    import_autoencoder,
    load_codec,
    train_autoencoder,
)

from .conftest import blobs

AE = dict(ae_channels=[8, 16])
TRAIN = dict(batch_size=8, crop=None, checkpoint_every=2)  # train_autoencoder's settings for 16 px blobs


# ---------------------------------------------------------------- autoencoder
def test_latent_round_trip_keeps_shape_and_range():
    codec = LatentCodec(build_autoencoder(ae_spec(LatentConfig(**AE), 1)), scale=2.0)
    x, _ = blobs(4, 16)
    z = codec.encode(x)
    assert z.shape == (4, LATENT_CHANNELS, 8, 8)
    r = codec.decode(z)
    assert r.shape == x.shape and r.min() >= -1 and r.max() <= 1
    ident = LatentCodec(None)
    assert ident.is_identity and torch.equal(ident.encode(x), x) and torch.equal(ident.decode(x * 3), (x * 3).clamp(-1, 1))


def test_train_autoencoder_scales_latents_and_reports_psnr_ssim(tmp_path):
    x, _ = blobs(16, 16)
    cfg = LatentConfig(**AE, ae_epochs=1)
    path = train_autoencoder(cfg, x, tmp_path, seed=0, heldout=x[:4], max_steps=2, **TRAIN)
    codec = load_codec(path)
    z = codec.encode_all(x, progress=False)
    assert z.std().item() == pytest.approx(1.0, rel=1e-3)  # scaled to unit variance
    recon = codec.info["recon"]
    assert recon["n"] == 4 and math.isfinite(recon["psnr"]) and -1 <= recon["ssim"] <= 1
    assert (tmp_path / "recon.png").stat().st_size > 0 and (tmp_path / "last.safetensors").exists()


def test_import_autoencoder_checks_keys_and_names_the_file(tmp_path):
    from safetensors.torch import save_file

    x, _ = blobs(8, 16)
    cfg = LatentConfig(**AE)
    ae = build_autoencoder(ae_spec(cfg, 1))
    good = tmp_path / "user_ae.safetensors"
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(good))  # no dcube metadata
    out = import_autoencoder(cfg, good, x, tmp_path / "imported", heldout=x[:2])
    codec = load_codec(out)
    assert codec.info["source"] == str(good) and codec.scale > 0
    bad = tmp_path / "wrong.safetensors"
    save_file({"encoder.nope": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="wrong.safetensors"):
        import_autoencoder(cfg, bad, x, tmp_path / "x")
    assert ae_spec(LatentConfig(ae_channels=[12, 24]), 1)["norm_num_groups"] == 4  # divides every level
    assert ae_spec(LatentConfig(), 1)["norm_num_groups"] == 8


# ---------------------------------------------------------------- zero-shot classifier
def test_zero_shot_scores_are_a_distribution_and_deterministic(micro_unet):
    model, sched = micro_unet
    x, _ = blobs(6, 16)
    cfg = ZeroShotOptions(trials=6, batch_size=10)
    a = classify_zero_shot(model, sched, x, cfg, seed=3, progress=False)
    b = classify_zero_shot(model, sched, x, cfg, seed=3, progress=False)
    assert a.probs.shape == (6, 2) and torch.equal(a.probs, b.probs)
    assert torch.allclose(a.probs.sum(1), torch.ones(6)) and (a.probs >= 0).all()
    assert a.evaluations == 6 * 2 * 6
    c = classify_zero_shot(model, sched, x, cfg, seed=4, progress=False)
    assert not torch.equal(a.errors, c.errors)  # another seed, other (t, noise) draws


def test_adaptive_keeps_every_class_when_nothing_is_clearly_worse(micro_unet):
    model, sched = micro_unet
    x, _ = blobs(4, 16)
    plain = classify_zero_shot(model, sched, x, ZeroShotOptions(trials=6), progress=False)
    same = classify_zero_shot(model, sched, x, ZeroShotOptions(trials=6), adaptive=Adaptive(3, 1e9), progress=False)
    assert torch.allclose(plain.probs, same.probs) and same.evaluations == plain.evaluations
    eager = Adaptive(first_round=3, drop_z=-1e9)  # drops all but the best
    fast = classify_zero_shot(model, sched, x, ZeroShotOptions(trials=6), adaptive=eager, progress=False)
    assert fast.evaluations == 4 * 2 * 3  # every image decided after the first round
    assert torch.allclose(fast.probs.sum(1), torch.ones(4))


def test_combine_scores_dropped_classes_relative_to_the_reference():
    nan = float("nan")
    e = torch.tensor([[[1.0, 3.0, 5.0, 7.0], [2.0, 4.0, nan, nan]]])  # class 1 dropped after 2 trials
    out = combine(e, torch.ones(4))
    assert out[0, 0].item() == pytest.approx(4.0)  # its own mean over all trials
    assert out[0, 1].item() == pytest.approx(5.0)  # 4 + mean paired excess 1
    assert spread_order(8, 4)[:4] == [0, 2, 4, 6]


def test_trials_follow_the_configured_timesteps_and_weighting(micro_unet):
    _, sched = micro_unet
    tr = make_trials(ZeroShotOptions(trials=4, timesteps=[10, 20]), (1, 4, 4), sched.alphas_cumprod)
    assert sorted(tr.t.tolist()) == [10, 10, 20, 20] and torch.allclose(tr.weight, torch.ones(4))
    w = make_trials(ZeroShotOptions(trials=4, weighting="min_snr"), (1, 4, 4), sched.alphas_cumprod).weight
    assert w.mean().item() == pytest.approx(1.0) and w.std() > 0
    with pytest.raises(ValueError, match="first-round"):
        classify_zero_shot(micro_unet[0], sched, blobs(2)[0], ZeroShotOptions(trials=3), adaptive=True, progress=False)
    with pytest.raises(ValueError, match="--weighting"):
        classify_zero_shot(micro_unet[0], sched, blobs(2)[0], ZeroShotOptions(weighting="elbo"), progress=False)


def test_zero_shot_beats_chance_after_a_short_training(tmp_path):
    """A pixel-space model trained for seconds on an easy two-class set classifies zero-shot."""
    from dcube.diffusion.schedule import ddpm_scheduler
    from dcube.diffusion.trainer import load_denoiser, train_diffusion

    x, y = blobs(64, 8)
    xt, yt = blobs(32, 8, seed=1)
    cfg = DiffusionConfig(backbone="unet", preset="micro", epochs=100, max_steps=30, batch_size=32, lr=3e-3,
                          sample_grid=False, contrastive_weight=0.0, checkpoint_every=1000)
    torch.manual_seed(0)  # the initial weights
    model, dcfg = load_denoiser(train_diffusion(cfg, x, y, 2, tmp_path, seed=0))
    for adaptive in (False, True):
        res = classify_zero_shot(model, ddpm_scheduler(dcfg), xt, ZeroShotOptions(trials=8), adaptive=adaptive,
                                 progress=False)
        assert (res.pred == yt).float().mean() >= 0.75, adaptive  # chance is 0.5 (P(>= 24/32) < 0.5 %)


# ---------------------------------------------------------------- error maps, analysis, heads
def test_error_map_and_overlay(micro_unet, tmp_path):
    from dcube.latent.errormaps import write_error_maps

    model, sched = micro_unet
    x, y = blobs(4, 16)
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1], [0.2, 0.8]])
    out = write_error_maps(model, sched, LatentCodec(None), x, y, probs, ["left", "right"], tmp_path, per_class=1,
                           timesteps=[100], noises=1)
    assert [o["true"] for o in out] == ["left", "right"] and out[1]["pred"] == "right"
    assert all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in (o["path"] for o in out))


class _Oracle(torch.nn.Module):
    """A denoiser that knows the clean image: under class 0 it predicts the true noise everywhere (a perfect
    reconstruction); under class 1 only on the right half (the left half is reconstructed as the noisy image)."""

    def __init__(self, x, scheduler):
        super().__init__()
        self.x, self.ab = x, scheduler.alphas_cumprod

    def forward(self, zt, t, c):
        ab = self.ab[t].view(-1, 1, 1, 1)
        eps = (zt - ab.sqrt() * self.x) / (1 - ab).sqrt()
        half = torch.ones_like(eps)
        half[..., : eps.shape[-1] // 2] = 0
        return torch.where((c == 0).view(-1, 1, 1, 1), eps, eps * half)


def test_error_map_sign_and_place(micro_unet):
    """Red (positive) where the predicted class reconstructs the image better, and only there; the sign
    flips when the roles of the classes flip."""
    from dcube.latent.errormaps import error_map

    _, sched = micro_unet
    x, _ = blobs(1, 16)
    model = _Oracle(x[:1], sched)
    emap = error_map(model, sched, LatentCodec(None), x[0], (0, 1), timesteps=[100, 400], noises=2)
    left, right = emap[:, :8], emap[:, 8:]
    assert (left > 0).float().mean() > 0.95 and right.abs().max() < 1e-4 * left.abs().mean()
    flipped = error_map(model, sched, LatentCodec(None), x[0], (1, 0), timesteps=[100, 400], noises=2)
    assert torch.allclose(flipped, -emap, atol=1e-5)


def test_analysis_grid_heatmap_and_recommendation(micro_unet, tmp_path):
    from dcube.latent.analysis import AnalysisOptions, analyze, plot_analysis

    model, sched = micro_unet
    x, y = blobs(24, 16)
    opts = AnalysisOptions(timesteps=[10, 500], images=24, zs_images=8, zs_trials=2, folds=3, top_layers=2)
    res = analyze(model, sched, x, y, opts, progress=False)
    assert set(res["probe_balanced_accuracy"]) == set(model.feature_names)
    assert all(set(v) == {"10", "500"} for v in res["probe_balanced_accuracy"].values())
    assert set(res["zero_shot_accuracy"]) == {"10", "500"}
    rec = res["recommended"]
    assert rec["timestep"] in (10, 500) and len(rec["layers"]) == 2
    feats = from_dict(apply_overrides({}, res["feature_overrides"])).features  # consumable by the pipeline
    assert feats.layers == rec["layers"] and feats.timestep == rec["timestep"] and feats.input_mode == "xt"
    assert plot_analysis(res, tmp_path / "a.png").stat().st_size > 1000


def test_mlp_head_and_finetune_update_the_denoiser(micro_unet):
    from dcube.latent.head import (
        FineTuneModel,
        features,
        finetune,
        linear_probe,
        train_mlp_head,
    )

    model, sched = micro_unet
    x, y = blobs(32, 16)
    f = features(model, x, ["mid", "up_0"], 50, sched)
    assert f.shape[0] == 32
    assert linear_probe(f, y, f[:3]).shape == (3, 2)
    head, info = train_mlp_head(f[:24], y[:24], f[24:], y[24:], 2, epochs=3, progress=False)
    assert len(info["history"]) == 3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ft = FineTuneModel(model, head, ["mid", "up_0"], 50, sched)
    with torch.no_grad():  # the same noise per image index as the cached features
        assert torch.allclose(ft.predict(x), head(f).softmax(1), atol=1e-5)
    out = finetune(ft, x[:24], y[:24], x[24:], y[24:], epochs=1, progress=False, lr=1e-3, batch_size=16)
    assert [h["epoch"] for h in out["history"]] == [0, 1]
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert changed == (out["best_epoch"] == 1)  # the best epoch's weights are kept: epoch 0 means untouched


def test_finetune_keeps_the_better_epoch_and_moves_the_denoiser(micro_unet, monkeypatch):
    """With a validation score that rises each epoch, fine-tuning must end on epoch 2 with changed weights."""
    import dcube.latent.head as head_mod
    from dcube.latent.head import FineTuneModel, features, finetune, train_mlp_head

    model, sched = micro_unet
    x, y = blobs(32, 16)
    f = features(model, x, ["mid"], 50, sched)
    head, _ = train_mlp_head(f[:24], y[:24], f[24:], y[24:], 2, epochs=2, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = iter(range(100))
    monkeypatch.setattr(head_mod, "_balanced_acc", lambda *a: next(calls) / 100)
    out = finetune(FineTuneModel(model, head, ["mid"], 50, sched), x[:24], y[:24], x[24:], y[24:], epochs=2, progress=False,
                   lr=1e-3, batch_size=16)
    assert out["best_epoch"] == 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.load_state_dict(before)  # the module-scoped fixture stays as it was


# ---------------------------------------------------------------- run directory and CLI
def test_latent_run_end_to_end_on_an_image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    from dcube.cli.latent import register

    x, y = blobs(24, 16)
    for i, (img, lab) in enumerate(zip(x, y)):
        d = tmp_path / "data" / ("left" if lab == 0 else "right")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((img[0].numpy() + 1) * 127.5).astype(np.uint8)).save(d / f"{i}.png")
    p = argparse.ArgumentParser()
    handlers = register(p.add_subparsers(dest="cmd"))
    assert set(handlers) == {"train-autoencoder", "train-latent-diffusion", "classify-zero-shot", "analyze",
                             "train-latent-head"}
    common = ["--run-dir", str(tmp_path / "run"), "--set", "data.source=folder", "--set", f"data.path={tmp_path / 'data'}",
              "--set", "data.image_size=16", "--set", "diffusion.preset=micro", "--set", "diffusion.max_steps=2",
              "--set", "diffusion.batch_size=8", "--set", "latent.ae_epochs=1",
              "--set", "latent.ae_channels=[8,16]"]
    for argv in (["train-latent-diffusion"], ["classify-zero-shot", "--error-maps", "1", "--adaptive", "--first-round", "2", "--t-max", "900",
                 "--trials", "3"]):
        args = p.parse_args(argv + common)
        assert args.func(args) == 0
    lat = tmp_path / "run" / "latent"
    assert (lat / "diffusion" / "latent.json").exists() and (lat / "diffusion" / "samples.png").exists()
    assert (lat / "zeroshot" / "test_adaptive.json").exists() and list((lat / "zeroshot" / "error_maps").glob("*.png"))
    # the zero-shot's test record is the one every evaluating command writes: `dcube compare` pairs it
    from dcube.compare import compare_runs

    assert json.loads((lat / "zeroshot" / "test_adaptive.json").read_text())["options"]["t_max"] == 900
    zs = lat / "zeroshot" / "metrics_adaptive.json"
    assert compare_runs([zs], [zs])["diff"] == 0 and "ci95" in json.loads(zs.read_text())["test"]
    args = p.parse_args(["analyze", "--model", str(tmp_path / "missing.safetensors")] + common)
    assert args.func(args) == 2  # a clear error, not a traceback


@pytest.mark.parametrize("backbone", ["unet", "uvit"])
def test_latent_diffusion_trains_on_latents_and_samples_decoded_images(tmp_path, backbone):
    from dcube.latent.diffusion import (
        load_model,
        sample_decoded,
        train_latent_diffusion,
    )

    x, y = blobs(16, 16)
    ae_path = train_autoencoder(LatentConfig(**AE), x, tmp_path / "ae", max_steps=1, **TRAIN)
    codec = load_codec(ae_path)
    z = codec.encode_all(x, progress=False)
    cfg = DiffusionConfig(backbone=backbone, preset="micro", max_steps=2, batch_size=8, sample_grid=False)
    path = train_latent_diffusion(cfg, codec, z, y, 2, tmp_path / "diff")
    model, dcfg, codec2 = load_model(path)
    assert model.in_channels == LATENT_CHANNELS and model.image_size == 8 and not codec2.is_identity
    assert codec2.scale == codec.scale
    imgs = sample_decoded(model, dcfg, codec2, torch.tensor([0, 1]), steps=2)
    assert imgs.shape == (2, 1, 16, 16) and imgs.abs().max() <= 1


def test_bad_latent_values_are_errors_naming_the_field(tmp_path, capsys):
    from dcube.cli.latent import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    for bad, field in (("latent.zs_trials=0", "--trials"), ("latent.ae_channels=[8,-4]", "latent.ae_channels"),
                       ("latent.zs_weighting=min_snr", "--weighting"),
                       ("latent.nope=1", "latent.nope")):
        args = p.parse_args(["analyze", "--run-dir", str(tmp_path), "--set", bad])
        assert args.func(args) == 2
        assert field in capsys.readouterr().err


def test_latent_run_refuses_a_config_its_outputs_were_not_made_with(tmp_path):
    """The latent path opens its run directory like Run: a changed autoencoder key after the autoencoder
    exists, or a changed seed, is a one-line ConfigError; a key of a stage not run yet may change freely."""
    from dcube.config import ConfigError
    from dcube.latent.run import Latent

    def cfg(diffusion=None, **latent):
        return from_dict({"run_dir": str(tmp_path / "run"), "latent": latent, "diffusion": diffusion or {}})

    Latent(cfg(ae_channels=[8, 16]))
    ae = tmp_path / "run" / "latent" / "autoencoder" / "autoencoder.safetensors"
    ae.parent.mkdir(parents=True)
    ae.write_bytes(b"x")  # as if trained
    Latent(cfg({"lr": 1e-3}, ae_channels=[8, 16]))  # the latent step-1 model is not made yet: free to change
    with pytest.raises(ConfigError, match="latent.ae_channels differs"):
        Latent(cfg(ae_channels=[8, 32]))
    with pytest.raises(ConfigError, match="seed 1 differs"):
        Latent(from_dict({"run_dir": str(tmp_path / "run"), "seed": 1, "latent": {"ae_channels": [8, 16]}}))


def test_the_help_of_the_latent_options_says_their_defaults():
    """dcube analyze / classify-zero-shot leave an option unset (its dataclass default applies); the help says
    the default, and it is the dataclass's."""
    import argparse
    import dataclasses

    from dcube.cli.latent import register
    from dcube.diffusion.zeroshot import Adaptive
    from dcube.latent.analysis import AnalysisOptions

    handlers = register(argparse.ArgumentParser().add_subparsers(dest="cmd"))
    for cmd, cls in (("analyze", AnalysisOptions), ("classify-zero-shot", Adaptive),
                     ("classify-zero-shot", ZeroShotOptions)):
        helps = {a.dest: a.help for a in handlers[cmd][0]._actions}
        for f in dataclasses.fields(cls):
            if cls is ZeroShotOptions and f.name == "timesteps":  # no fixed set: the help says how they are spaced
                continue
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            said = " ".join(map(str, value)) if isinstance(value, list) else str(value)
            assert helps[f.name].endswith(f"(default: {said})"), (cmd, f.name, helps[f.name])
