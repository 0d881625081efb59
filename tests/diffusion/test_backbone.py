"""Pretrained step-1 backbones (issue 33): pretrain on an unlabelled pool, start a run from the file, predict;
a backbone of another architecture, preset, size or channel count is refused before anything trains."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dcube.cli import main

SIZE = 16


def _pngs(root: Path, n: int, seed: int, classes=("A", "B")):
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / classes[i % len(classes)] if classes else root
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


def _config(tmp: Path, **diffusion) -> Path:
    cfg = {"run_dir": str(tmp / "run"), "threads": 1,
           "data": {"source": "folder", "path": str(tmp / "data"), "image_size": SIZE, "val_fraction": 0.2,
                    "test_fraction": 0.2},
           "diffusion": {"preset": "micro", "max_steps": 2, "batch_size": 8, "sample_grid": False, **diffusion},
           "classifier": {"subfeature": "none", "epochs": 1, "batch_size": 8}}
    p = tmp / f"cfg{len(list(tmp.glob('cfg*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture
def backbone(tmp_path):
    _pngs(tmp_path / "data", 24, 0)
    _pngs(tmp_path / "pool", 30, 1, classes=())
    out = tmp_path / "backbone.safetensors"
    cfg = _config(tmp_path)
    assert main(["pretrain", str(cfg), "--pool", str(tmp_path / "pool"), "--out", str(out), "--run-dir",
                 str(tmp_path / "pre")]) == 0
    return out


def test_pretrain_then_start_a_run_from_it_then_predict(backbone, tmp_path, capsys):
    from dcube.diffusion.backbone import KIND, class_table_name, read_meta
    from dcube.diffusion.trainer import load_denoiser
    from dcube.utils.io import load_tensors

    meta = read_meta(backbone)
    assert meta["kind"] == KIND and meta["pool"]["images"] == 30 and len(meta["pool"]["fingerprint"]) == 64
    assert meta["history"]["steps"] == 2 and meta["spec"]["preset"] == "micro"
    # kept frozen (epochs 0): step 1's model IS the backbone, the class rows all start from its null row
    cfg = _config(tmp_path, init_from=str(backbone), epochs=0, max_steps=None)
    assert main(["run", str(cfg)]) == 0
    model, _ = load_denoiser(tmp_path / "run" / "diffusion" / "ema.safetensors")
    pre = {k[len("model."):]: v for k, v in load_tensors(backbone)[0].items()}
    table = class_table_name(model)
    for k, v in model.state_dict().items():
        want = pre[k] if k != table else pre[k][-1].expand_as(v)
        assert torch.equal(v, want), k
    # fine-tuned: starts there and moves
    cfg = _config(tmp_path, init_from=str(backbone))
    assert main(["run", str(cfg), "--run-dir", str(tmp_path / "tuned")]) == 0
    tuned, _ = load_denoiser(tmp_path / "tuned" / "diffusion" / "ema.safetensors")
    assert any(not torch.equal(v, pre[k]) for k, v in tuned.state_dict().items() if k != table)
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path / "tuned"), str(tmp_path / "data" / "A"), "--out", str(out)]) == 0
    assert len(json.loads((out / "predictions.json").read_text())["predictions"]) == 12


@pytest.mark.parametrize("change, needle", [
    ({"preset": "tiny"}, "unet 'micro' model for 16 px"),
    ({"backbone": "uvit"}, "unet 'micro' model for 16 px"),
])
def test_a_backbone_of_another_model_is_refused_before_training(backbone, tmp_path, capsys, change, needle):
    cfg = _config(tmp_path, init_from=str(backbone), **change)
    assert main(["run", str(cfg), "--run-dir", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "diffusion.init_from" in err and needle in err and len(err.strip().splitlines()) == 1, err
    assert not list((tmp_path / "other").rglob("*.safetensors"))


def test_a_backbone_of_another_size_or_channel_count_or_no_backbone_is_refused(backbone, tmp_path, capsys):
    from safetensors.torch import save_file

    for sets in (["data.image_size=32"], ["data.channels=3"]):
        cfg = _config(tmp_path, init_from=str(backbone))
        assert main(["run", str(cfg), "--run-dir", str(tmp_path / "x"), *[a for s in sets for a in ("--set", s)]]) == 2
        err = capsys.readouterr().err
        assert "diffusion.init_from" in err and "16 px, 1 channel(s)" in err, err
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    cfg = _config(tmp_path, init_from=str(tmp_path / "plain.safetensors"))
    assert main(["run", str(cfg), "--run-dir", str(tmp_path / "y")]) == 2
    assert "not a dcube step-1 model or backbone" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").rglob("*.safetensors"))


def test_pretrain_refuses_an_output_it_would_overwrite_before_training(tmp_path, capsys):
    _pngs(tmp_path / "data", 24, 0)
    _pngs(tmp_path / "pool", 10, 1, classes=())
    cfg = _config(tmp_path)
    for out, needle in ((tmp_path / "pool", "must name a .safetensors file"), (cfg, "must name a .safetensors"),
                        (tmp_path / "no" / "b.safetensors", "does not exist")):
        assert main(["pretrain", str(cfg), "--pool", str(tmp_path / "pool"), "--out", str(out), "--run-dir",
                     str(tmp_path / "pre")]) == 2
        err = capsys.readouterr().err
        assert needle in err and "details" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "pre" / "pretrain").exists()
