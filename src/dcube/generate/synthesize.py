"""Sample a trained step-1 checkpoint into PNG files ``out/<class>/*.png`` plus a manifest.

``manifest.csv`` has one row per image: path, label, class, index, checkpoint_sha256,
train_sha256, seed, sampler, steps, guidance. ``synthetic.json`` summarises the set
(class names, counts, sizes, sampling time).
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from dcube.diffusion.sampling import sample_images
from dcube.diffusion.trainer import load_denoiser
from dcube.generate.synthetic import INFO, MANIFEST, SyntheticSet, load_synthetic
from dcube.utils.io import atomic_write_bytes, atomic_write_text, safe_name, sha256_file, write_json

COLUMNS = ("path", "label", "class", "index", "checkpoint_sha256", "train_sha256", "seed", "sampler",
           "steps", "guidance")


def to_png(image: torch.Tensor) -> bytes:
    """(C, H, W) in [-1, 1] -> 8-bit PNG bytes (grayscale or RGB)."""
    a = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else np.ascontiguousarray(a)).save(buf, format="PNG")
    return buf.getvalue()


STARTED = ".dcube-synthesize"  # written before the first image: the folder is a set of dcube's, finished or not


def synthesize(checkpoint: str | Path, counts: Sequence[int], out_dir: str | Path, class_names: Sequence[str],
               train_sha256: str, *, sampler: str = "ddim", steps: int | None = None, guidance: float = 0.0,
               seed: int = 0, batch_size: int = 256, device="cpu", overwrite: bool = False,
               progress: bool = True) -> SyntheticSet:
    """Generate ``counts[c]`` images of every class c and write them to `out_dir`.

    `checkpoint`: a step-1 ``ema.safetensors`` trained on the training split whose image
    fingerprint is `train_sha256` (:func:`dcube.generate.synthetic.train_fingerprint`).
    Refuses a non-empty `out_dir` that already holds a set unless `overwrite`.
    """
    out_dir = Path(out_dir)
    # a set, or one cut short before its manifest (the mark is written before the first image)
    ours = any((out_dir / f).exists() for f in (MANIFEST, INFO, STARTED))
    if out_dir.is_dir() and any(out_dir.iterdir()) and not ours:
        raise FileExistsError(f"{out_dir} holds files that are not a synthetic set of dcube's; choose an empty or new "
                              "output folder (synthetic images are never mixed into another folder)")
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a synthetic set ({MANIFEST}); choose another output "
                              "folder or pass overwrite")
    model, cfg = load_denoiser(checkpoint, device)
    names = [str(c) for c in class_names]
    if not (model.num_classes == len(names) == len(counts)):
        raise ValueError(f"{checkpoint}: the model has {model.num_classes} classes, class_names has {len(names)} "
                         f"and counts has {len(counts)}")
    if guidance > 0 and cfg.class_dropout == 0:
        raise ValueError(f"{checkpoint}: guidance {guidance} needs a model trained with diffusion.class_dropout > 0 "
                         "(it never learned the null class)")
    labels = torch.repeat_interleave(torch.arange(len(names)), torch.as_tensor(list(counts), dtype=torch.long))
    atomic_write_text(out_dir / STARTED, f"dcube synthesize from {checkpoint}\n")
    t0 = time.time()
    images = sample_images(model, cfg, labels, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
                           batch_size=batch_size, device=device, progress=progress, desc="synthesize")
    seconds = time.time() - t0
    steps = cfg.num_train_timesteps if sampler == "ddpm" else (min(50, cfg.num_train_timesteps) if steps is None else steps)
    ck_hash = sha256_file(checkpoint)
    rows, seen = [], [0] * len(names)
    for img, lab in zip(images, labels.tolist()):
        folder = safe_name(names[lab], "class")
        rel = f"{folder}/{folder}_{seen[lab]:05d}.png"
        atomic_write_bytes(out_dir / rel, to_png(img))
        rows.append(dict(path=rel, label=lab, **{"class": names[lab]}, index=seen[lab], checkpoint_sha256=ck_hash,
                         train_sha256=train_sha256, seed=seed, sampler=sampler, steps=steps, guidance=guidance))
        seen[lab] += 1
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_json(out_dir / INFO, {
        "class_names": names, "counts": [int(c) for c in counts], "image_size": model.image_size,
        "channels": model.in_channels, "checkpoint": str(checkpoint), "checkpoint_sha256": ck_hash,
        "train_sha256": train_sha256, "trained_on": "train split only", "sampler": sampler, "steps": steps,
        "guidance": guidance, "seed": seed, "batch_size": batch_size, "device": str(device),
        "sampling_seconds": round(seconds, 2), "images": len(labels)})
    atomic_write_text(out_dir / MANIFEST, buf.getvalue())  # last: its presence marks a complete set
    return load_synthetic(out_dir)
