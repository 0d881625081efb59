"""The `compute` switches in one process, and the process helpers' single-process behaviour."""

import pytest
import torch

from dcube.classify.trainer import FeatureSplit, train_classifier
from dcube.config import ClassifierConfig, ComputeConfig, ConfigError, DiffusionConfig, from_dict, load_config
from dcube.diffusion.trainer import LAST, train_diffusion
from dcube.utils import dist
from dcube.utils.io import load_tensors


def _images(n=24, size=16):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1, labels


STEP1 = DiffusionConfig(backbone="unet", preset="micro", epochs=1, max_steps=3, batch_size=12, sample_grid=False)


@pytest.mark.parametrize("values, field", [
    ({"compute": {"mixed_precision": "fp8"}}, "compute.mixed_precision"),
    ({"compute": {"grad_accum": 0}}, "compute.grad_accum"),
    ({"compute": {"compile": "yes"}}, "compute.compile"),
    ({"compute": {"chanels_last": True}}, "compute.chanels_last"),
])
def test_bad_compute_values_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_dict(values)


def test_compute_defaults_and_yaml_no(tmp_path):
    assert from_dict({}).compute == ComputeConfig(mixed_precision="no", grad_accum=1, compile=False,
                                                  channels_last="step2")
    p = tmp_path / "c.yaml"
    p.write_text("compute: {mixed_precision: no, grad_accum: 2}\n")  # YAML reads a bare no as false
    cfg = load_config(p, ["compute.channels_last=true"])
    assert cfg.compute == ComputeConfig(mixed_precision="no", grad_accum=2, channels_last="all")
    assert load_config(p, ["compute.channels_last=false"]).compute.channels_last == "no"
    with pytest.raises(ConfigError, match=r"compute\.channels_last"):
        load_config(p, ["compute.channels_last=step1"])


@pytest.mark.parametrize("value,step1,step2", [("no", False, False), ("step2", False, True), ("all", True, True),
                                               (True, True, True), (False, False, False)])
def test_channels_last_applies_to_the_stages_it_names(value, step1, step2):
    from dcube.utils.compute import memory_format, training_module

    compute = ComputeConfig(channels_last=value)
    x = torch.randn(2, 3, 4, 4)
    for stage, on in (("step1", step1), ("step2", step2)):
        conv = training_module(torch.nn.Conv2d(3, 3, 3), compute, stage)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == on, stage
        assert memory_format(x, compute, stage).is_contiguous() == (not on), stage


def test_helpers_are_no_ops_in_one_process():
    assert not dist.launched() and dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert torch.equal(dist.shard_indices(7, block=3), torch.arange(7))
    x = torch.randn(5, 2)
    assert dist.gather_ordered(x, 5) is x
    dist.barrier()
    # the layout gather_ordered undoes: blocks dealt out in turn, every row exactly once
    shards = [dist.shard_indices(11, block=3, rank_=r, world=2) for r in range(2)]
    assert shards[0].tolist() == [0, 1, 2, 6, 7, 8] and shards[1].tolist() == [3, 4, 5, 9, 10]


def test_grad_accum_gives_the_same_steps(tmp_path):
    """Two micro-batches per step: the same optimiser steps up to float rounding."""
    images, labels = _images()
    out = {}
    for accum in (1, 2):
        torch.manual_seed(0)
        path = train_diffusion(STEP1, images, labels, 2, tmp_path / str(accum), seed=1,
                               compute=ComputeConfig(grad_accum=accum))
        out[accum] = load_tensors(path)[0]
    for k in out[1]:
        assert torch.allclose(out[1][k], out[2][k], atol=1e-5, rtol=1e-4), k


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes(tmp_path, mode):
    images, labels = _images()
    compute = ComputeConfig(mixed_precision=mode, channels_last=True)
    torch.manual_seed(0)
    train_diffusion(STEP1, images, labels, 2, tmp_path / "d", seed=1, compute=compute)
    meta = load_tensors(tmp_path / "d" / LAST)[1]
    assert meta["step"] == 2 and all(torch.isfinite(torch.tensor(r["mse"])) for r in meta["history"])
    assert ("amp" in meta) == (mode == "fp16")  # the fp16 loss scale is resumed too

    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(24, 4, 4, 4, generator=g) + labels[:, None, None, None]]
    split = FeatureSplit(feats, images, labels, [f.flip(-1) for f in feats])
    cc = ClassifierConfig(subfeature="none", epochs=2, batch_size=8, cycle_weight=0)
    head, best = train_classifier(cc, split, split, ["a", "b"], tmp_path / "c", lambda y, p: (0.5, 0.5),
                                  compute=ComputeConfig(mixed_precision=mode, grad_accum=2, channels_last=True))
    assert best["epoch"] == 1 and all(torch.isfinite(p).all() for p in head.parameters())
