"""The latent method starts from a pretrained pair (issue 33): another run's autoencoder
(``latent.autoencoder``) and its latent denoiser (``diffusion.init_from``); a denoiser of another shape is
refused in one line before anything is written."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dcube.cli import main
from dcube.utils.io import load_tensors


def _folder(root: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        lab = i % 2
        img = rng.normal(0, 0.15, (16, 16))
        img[4:12, (2 if lab == 0 else 9):(2 if lab == 0 else 9) + 5] += 0.8
        d = root / ("left" if lab == 0 else "right")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(img, -1, 1) * 127.5 + 127.5).astype(np.uint8)).save(d / f"{i}.png")
    return root


def _argv(folder: Path, run: Path, *sets: str) -> list[str]:
    base = {"data.source": "folder", "data.path": str(folder), "data.image_size": 16, "diffusion.preset": "micro",
            "diffusion.max_steps": 2, "diffusion.batch_size": 8, "diffusion.sample_grid": "false",
            "latent.ae_epochs": 1, "latent.ae_channels": "[8,16]", "threads": 1}
    return ["--run-dir", str(run)] + [a for kv in [f"{k}={v}" for k, v in base.items()] + list(sets)
                                      for a in ("--set", kv)]


def test_a_latent_run_starts_from_another_runs_pair_and_refuses_a_pixel_model(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    pool = tmp_path / "pool"
    assert main(["train-latent-diffusion"] + _argv(data, pool)) == 0
    ae, ema = pool / "latent/autoencoder/autoencoder.safetensors", pool / "latent/diffusion/ema.safetensors"
    task = tmp_path / "task"
    assert main(["train-latent-diffusion"] + _argv(data, task, f"latent.autoencoder={ae}", f"diffusion.init_from={ema}",
                                                   "diffusion.epochs=0", "diffusion.max_steps=null")) == 0
    start, _ = load_tensors(task / "latent/diffusion/ema.safetensors")
    pre, _ = load_tensors(ema)
    table = [k for k in start if "class_embedding" in k]
    assert table and all(torch.equal(start[k], pre[k]) for k in start if k not in table)  # the pretrained denoiser
    # a pixel-space model (1 channel at 16 px) is not a denoiser of 4-channel latents at 8 px: refused up front
    pixel = tmp_path / "pixel"
    assert main(["train-diffusion"] + _argv(data, pixel)) == 0
    capsys.readouterr()
    wrong = tmp_path / "wrong"
    code = main(["train-latent-diffusion"] + _argv(data, wrong, f"diffusion.init_from={pixel}/diffusion/ema.safetensors"))
    err = capsys.readouterr().err
    assert code == 2 and "diffusion.init_from" in err and "latent channel" in err and len(err.strip().splitlines()) == 1
    assert not (wrong / "latent" / "autoencoder").exists()
