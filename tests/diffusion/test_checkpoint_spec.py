"""A step-1 checkpoint carries its model spec only, and a checkpoint written before 1.0 (the whole
DiffusionConfig in its metadata, with keys 1.0 removed) still loads and computes what it computed."""

from pathlib import Path

import torch

from dcube.config import DiffusionConfig
from dcube.diffusion.trainer import SPEC_KEYS, load_denoiser, train_diffusion
from dcube.utils.io import load_tensors

# written by `pre-1.0-variants` (train_diffusion: micro preset, 20 timesteps, 1 step, loss_weighting min_snr)
OLD = Path(__file__).parent / "data" / "step1_pre1.0.safetensors"


def _output(model) -> torch.Tensor:
    x = torch.linspace(-1, 1, 64).view(1, 1, 8, 8).repeat(2, 1, 1, 1)
    with torch.no_grad():
        return model(x, torch.tensor([3, 17]), torch.tensor([0, 1]))


def test_a_checkpoint_written_before_1_0_loads_and_computes_the_same():
    _, meta = load_tensors(OLD)
    assert "loss_weighting" in meta["diffusion"] and "spec" not in meta  # the old format, a removed key in it
    model, cfg = load_denoiser(OLD)
    assert (cfg.preset, cfg.num_train_timesteps, model.num_classes) == ("micro", 20, 2)
    out = _output(model)
    # the pre-1.0 code's own output for this input (its sum and absolute sum, computed when the file was made)
    assert abs(float(out.double().sum()) - -0.009119) < 1e-5 and abs(float(out.abs().double().sum()) - 0.100143) < 1e-5


def test_a_new_checkpoint_carries_the_model_spec_and_no_training_argument(tmp_path):
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    cfg = DiffusionConfig(preset="micro", max_steps=1, batch_size=8, sample_grid=False, num_train_timesteps=20,
                          lr=3e-3, patience=9)
    path = train_diffusion(cfg, x, torch.arange(16) % 2, 2, tmp_path)
    _, meta = load_tensors(path)
    assert set(meta["spec"]) == set(SPEC_KEYS) and "diffusion" not in meta
    assert "lr" not in meta["spec"] and "patience" not in meta["spec"]
    model, loaded = load_denoiser(path)
    assert all(getattr(loaded, k) == getattr(cfg, k) for k in SPEC_KEYS)
    assert loaded.lr == DiffusionConfig().lr  # training arguments are not the checkpoint's to carry
