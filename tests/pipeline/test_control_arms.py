"""The control arms of D-Cube (BENCHMARKS.md, "Does the diffusion model earn its place?"): the head on the
sub-feature CNN alone (classifier.diffusion_features: false) and the untrained denoiser (diffusion.epochs: 0).
A claim that the diffusion branch helps rests on these arms being exactly what they say."""

import numpy as np
import pytest
import torch

from dcube.classify.head import DCubeHead
from dcube.config import ConfigError, from_dict
from dcube.pipeline import run


def _cfg(shared_data, run_dir, **sections):
    base = {
        "run_dir": str(run_dir), "seed": 3, "threads": 1,
        "data": {"source": "medmnist", "name": "pneumoniamnist", "download": False,
                 "path": str(shared_data / "medmnist" / "pneumoniamnist.npz"),
                 "max_train": 96, "max_val": 32, "max_test": 32},
        "diffusion": {"backbone": "unet", "preset": "micro", "max_steps": 2, "batch_size": 32, "sample_grid": False},
        "classifier": {"subfeature": "resnet18", "epochs": 1, "batch_size": 32},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return from_dict(base)


def test_cnn_only_arm_feeds_the_head_no_diffusion_tensor(shared_data, tmp_path, monkeypatch):
    seen = []
    forward = DCubeHead.forward

    def spy(self, feats, image):
        seen.append(len(feats))
        return forward(self, feats, image)

    monkeypatch.setattr(DCubeHead, "forward", spy)
    out = run(_cfg(shared_data, tmp_path / "cnn", classifier={"diffusion_features": False}))
    assert seen and set(seen) == {0}, "a diffusion feature map reached the CNN-only head"
    assert out["layers"] == [] and out["test"]["auc"] == out["test"]["auc"]  # evaluated, not NaN
    d = tmp_path / "cnn"
    assert not (d / "diffusion").exists() and not list(d.glob("features/*.safetensors"))
    # the same head with the diffusion input: it gets the maps (the spy would see 0 if they were dropped)
    seen.clear()
    run(_cfg(shared_data, tmp_path / "dcube"))
    assert seen and min(seen) > 0

    # predict and export load the CNN-only run without a denoiser
    from dcube.predict import Predictor

    pred = Predictor(d)
    assert pred.model is None and pred.layers == []
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    raw, cal = pred(x)
    assert raw.shape == (3, 2) and np.allclose(raw.sum(1), 1, atol=1e-5)
    assert pred.diffusion_map(x[0], raw[0]) is None


def test_head_refuses_maps_it_was_not_built_for():
    from dcube.config import ClassifierConfig

    head = DCubeHead([], 2, 1, 28, ClassifierConfig(subfeature="resnet18"))
    assert head.proj is None
    with pytest.raises(ValueError, match="diffusion feature maps"):
        head([torch.zeros(2, 4, 7, 7)], torch.zeros(2, 1, 28, 28))


def test_untrained_arm_is_the_seeded_initialisation(shared_data, tmp_path):
    from dcube.diffusion import build_denoiser
    from dcube.diffusion.trainer import load_denoiser
    from dcube.utils.runtime import seed_everything

    cfg = _cfg(shared_data, tmp_path / "u", diffusion={"epochs": 0, "max_steps": None})
    run(cfg, stages=("diffusion",))
    saved, _ = load_denoiser(tmp_path / "u" / "diffusion" / "ema.safetensors")
    seed_everything(cfg.seed)
    init = build_denoiser(cfg.diffusion, 1, 28, 2).state_dict()
    assert all(torch.equal(v, init[k]) for k, v in saved.state_dict().items())
    seed_everything(cfg.seed + 1)
    other = build_denoiser(cfg.diffusion, 1, 28, 2).state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in saved.state_dict().items())


@pytest.mark.parametrize("sections, key", [
    ({"classifier": {"diffusion_features": False, "subfeature": "none"}}, "classifier.diffusion_features"),
    ({"classifier": {"diffusion_features": False, "cycle_weight": 1.0}}, "classifier.cycle_weight"),
    ({"diffusion": {"epochs": -1}}, "diffusion.epochs"),
    ({"features": {"ks_keep": "median"}}, "features.ks_keep"),
])
def test_control_arm_keys_are_checked(sections, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(sections)
