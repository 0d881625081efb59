"""Pretrained step-1 backbones: a denoiser trained once on a pool of unlabelled images, that any run's step 1
can start from (``diffusion.init_from``), as the latent-diffusion paper pre-trains on large X-ray collections.

A backbone file is a step-1 ``ema.safetensors`` (weights + JSON metadata: backbone, preset, image size,
channels) with what it was trained on added: the pool's fingerprint and size and the training history.
Starting from it, every weight is copied except the class-embedding table, whose rows (the task's classes and
the null class) all start from the backbone's null row: the conditioning for the task's classes is new.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from dcube.config import ConfigError, DiffusionConfig
from dcube.data.unlabelled import load_unlabelled
from dcube.diffusion.trainer import model_spec
from dcube.utils.io import load_tensors, read_json, save_tensors, sha256_tensor
from dcube.utils.runtime import configure_torch, seed_everything

KIND = "dcube step-1 backbone"


def read_meta(path: str | Path) -> dict:
    """The JSON metadata of a step-1 checkpoint or backbone file (the header only; never unpickled)."""

    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"diffusion.init_from: {path} does not exist")
    if not path.is_file():
        raise ValueError(f"diffusion.init_from: {path} is a folder; name the backbone file (.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("dcube", "{}"))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"diffusion.init_from: {path} is not a safetensors file ({exc})") from exc
    if not ("spec" in meta or "diffusion" in meta) or "image_size" not in meta:
        raise ValueError(f"diffusion.init_from: {path} is not a dcube step-1 model or backbone "
                         "(`dcube pretrain` writes one)")
    return meta


def check_backbone(path: str | Path, cfg: DiffusionConfig, channels: int, image_size: int) -> dict:
    """ValueError naming diffusion.init_from when the file's model is not this run's: another architecture,
    preset, image size or channel count. -> its metadata."""
    meta = read_meta(path)
    d = model_spec(meta)
    theirs = (d.get("backbone"), d.get("preset"), meta["image_size"], meta["in_channels"])
    mine = (cfg.backbone, cfg.preset, image_size, channels)
    if theirs != mine:
        raise ValueError(f"diffusion.init_from: {path} holds a {theirs[0]} {theirs[1]!r} model for {theirs[2]} px, "
                         f"{theirs[3]} channel(s); this run builds a {mine[0]} {mine[1]!r} model for {mine[2]} px, "
                         f"{mine[3]} channel(s). Pretrain a matching backbone or change diffusion.backbone / "
                         f"preset, data.image_size / channels")
    return meta


def class_table_name(model: torch.nn.Module) -> str:
    table = model.class_embedding.weight
    return next(name for name, p in model.named_parameters() if p is table)


def init_from_backbone(model: torch.nn.Module, path: str | Path) -> None:
    """Copy a backbone's weights into `model` (built for this run's classes): every tensor but the class table,
    whose rows all start from the backbone's null row."""
    tensors, _ = load_tensors(path)
    sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    name = class_table_name(model)
    null_row = sd.pop(name)[-1]
    table = model.state_dict()[name].clone()
    table[:] = null_row
    model.load_state_dict({**sd, name: table}, strict=True)


def save_backbone(ema_path: str | Path, out: str | Path, pool: dict, history: dict) -> Path:
    """The backbone file: `ema_path`'s weights and model metadata, plus the pool and the training history."""
    tensors, meta = load_tensors(ema_path)
    meta.update(kind=KIND, pool=pool, history=history)
    return save_tensors(out, tensors, meta)


def pretrain(cfg, pool: str | Path, out: str | Path, with_train: bool = False, device: str = "cpu") -> Path:
    """Train a step-1 model on the unlabelled `pool` (folder, CSV with a path column, or npz), every image under
    the null class, with `cfg`'s data size, channels and diffusion settings (no contrastive term: there are no
    labels); with `with_train` the task's training images join it, without their labels. Checkpoints (resume)
    go to ``cfg.run_dir/pretrain``; the backbone file to `out`. -> `out`."""

    from dcube.diffusion.trainer import train_diffusion
    out = Path(out).expanduser()
    if out.is_dir() or out.suffix != ".safetensors":
        raise ConfigError(f"--out: {out} must name a .safetensors file (not a folder)")
    if out.exists():
        raise ConfigError(f"--out: {out} exists; dcube does not overwrite it (choose another name)")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: the folder {out.parent} does not exist")
    configure_torch(cfg.threads)
    d = cfg.data
    images, ids = load_unlabelled(pool, d.image_size, d.channels)
    n_train = 0
    if with_train:
        from dcube.data import load_data
        from dcube.data.store import cat_images

        train = load_data(d, cfg.seed).train
        images, n_train = cat_images([images, train.images]), len(train)
    images = torch.as_tensor(images)
    work = Path(cfg.run_dir) / "pretrain"
    dcfg = dataclasses.replace(cfg.diffusion, contrastive_weight=0.0, init_from=None, sample_grid=False)
    seed_everything(cfg.seed)
    ema = train_diffusion(dcfg, images, torch.full((len(images),), -1, dtype=torch.long), 1, work, seed=cfg.seed,
                          device=device, compute=cfg.compute)
    hist = read_json(work / "history.json")
    pool_info = {"path": str(pool), "images": len(ids), "task_training_images": n_train,
                 "fingerprint": sha256_tensor(images), "seed": cfg.seed}
    return save_backbone(ema, out, pool_info, {"steps": hist["steps"], "mse": [h["mse"] for h in hist["history"]]})
