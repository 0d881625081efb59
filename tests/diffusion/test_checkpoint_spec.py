"""A step-1 checkpoint carries its model spec only, and a checkpoint written before 1.0 (the whole
DiffusionConfig in its metadata, with keys 1.0 removed) still loads and computes what the same weights do."""

import pytest
import torch

from dcube.config import DiffusionConfig
from dcube.diffusion.trainer import SPEC_KEYS, load_denoiser, train_diffusion
from dcube.utils.io import load_tensors, save_tensors

# the metadata `pre-1.0-variants` wrote into a step-1 checkpoint: the whole DiffusionConfig of its day, keys
# removed since included (copied from a file that code wrote: micro preset, 20 timesteps, loss_weighting min_snr)
OLD_META = {"diffusion": {
    "backbone": "unet", "preset": "micro", "num_train_timesteps": 20, "beta_start": 0.0001, "beta_end": 0.02,
    "epochs": 5, "max_steps": 1, "patience": 5, "eval_every": 200, "auto_max_epochs": 1000, "probe_images": 512,
    "batch_size": 8, "lr": 0.0002, "weight_decay": 0.0, "ema_decay": 0.999, "contrastive_weight": 0.1,
    "contrastive_margin": 1.0, "contrastive_form": "normalized", "loss_weighting": "min_snr", "min_snr_gamma": 5.0,
    "checkpoint_every": 200, "sample_grid": False, "sample_steps": 50, "grid_samplers": ["ddim"],
    "class_dropout": 0.1, "init_from": None}, "in_channels": 1, "image_size": 8, "num_classes": 2, "step": 1}
CFG = dict(preset="micro", max_steps=1, batch_size=8, sample_grid=False, num_train_timesteps=20)


def _output(model) -> torch.Tensor:
    x = torch.linspace(-1, 1, 64).view(1, 1, 8, 8).repeat(2, 1, 1, 1)
    with torch.no_grad():
        return model(x, torch.tensor([3, 17]), torch.tensor([0, 1]))


def test_a_checkpoint_written_before_1_0_loads_and_computes_the_same(tmp_path):
    path = train_diffusion(DiffusionConfig(**CFG), torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 2, 2, tmp_path)
    tensors, _ = load_tensors(path)
    old = save_tensors(tmp_path / "old.safetensors", tensors, OLD_META)  # the same weights, the old metadata
    model, cfg = load_denoiser(old)
    assert (cfg.preset, cfg.num_train_timesteps, model.num_classes) == ("micro", 20, 2)
    assert torch.equal(_output(model), _output(load_denoiser(path)[0]))
    other = {**OLD_META, "diffusion": {**OLD_META["diffusion"], "beta_end": 0.012}}  # another noise schedule
    with pytest.raises(ValueError, match="beta schedule 0.0001 .. 0.012"):
        load_denoiser(save_tensors(tmp_path / "other.safetensors", tensors, other))


def test_a_new_checkpoint_carries_the_model_spec_and_no_training_argument(tmp_path):
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    cfg = DiffusionConfig(**CFG, lr=3e-3, patience=9)
    path = train_diffusion(cfg, x, torch.arange(16) % 2, 2, tmp_path)
    _, meta = load_tensors(path)
    assert set(meta["spec"]) == {*SPEC_KEYS, "beta_start", "beta_end"} and "diffusion" not in meta
    assert "lr" not in meta["spec"] and "patience" not in meta["spec"]
    model, loaded = load_denoiser(path)
    assert all(getattr(loaded, k) == getattr(cfg, k) for k in SPEC_KEYS)
    assert loaded.lr == DiffusionConfig().lr  # training arguments are not the checkpoint's to carry
