"""Run by tests/distributed under `torchrun --nproc_per_node 2`: a tiny whole pipeline, then
the pieces the tests compare with one process (written by rank 0 outside the run directory).

Rank 1 records every file it opens for writing, renames or removes under the work folder
(an audit hook) and leaves the list in audit-rank1.json for the test."""

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

WORK = Path(sys.argv[1])
RANK = int(os.environ["RANK"])
written: list[str] = []
recording = True


def audit(event, args):
    if not recording or event not in ("open", "os.rename", "os.remove", "os.replace"):
        return
    path = str(args[0])
    if event == "open":
        mode, flags = args[1], args[2]
        writes = (mode and any(m in mode for m in "wax+")) or (isinstance(flags, int) and flags & (
            os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if not writes:
            return
    if path.startswith(str(WORK / "run")):
        written.append(f"{event} {path}")


if RANK == 1:
    sys.addaudithook(audit)

from dcube.cli import main  # noqa: E402
from dcube.config import LatentConfig, from_dict  # noqa: E402
from dcube.diffusion.zeroshot import ZeroShotOptions  # noqa: E402
from dcube.features import extract  # noqa: E402
from dcube.pipeline import DCube  # noqa: E402
from dcube.utils import dist  # noqa: E402
from dcube.utils.io import save_tensors  # noqa: E402

CONFIG = json.loads((WORK / "config.json").read_text())
AE = dict(ae_channels=[16, 16], ae_epochs=1)
AE_TRAIN = dict(batch_size=7, crop=8, max_steps=3)  # an odd batch split over 2 ranks, random crops
ZS = ZeroShotOptions(trials=3, batch_size=4)
assert dist.world_size() == 2 and dist.rank() == RANK

assert main(["run", str(WORK / "config.yaml")]) == 0  # the CLI, as `torchrun ... -m dcube.cli run` runs it

r = DCube(from_dict(CONFIG))
model, dcfg = r.denoiser()
fc = r.cfg.features
images = r.data.train.images
maps = extract(model, images, model.feature_names, fc, r.cfg.seed, r._scheduler(dcfg), progress=False,
               batch_size=8)

# the on-disk path: both ranks decode into ONE store (the same run directory), then extract through a
# DataLoader worker; the gathered maps must equal the in-RAM ones of one process
import dataclasses  # noqa: E402

from dcube.data import load_data  # noqa: E402

on_disk = load_data(dataclasses.replace(r.cfg.data, in_memory_mb=0), r.cfg.seed, WORK / "diskstore")
assert type(on_disk.train.images).__name__ == "DiskRows"
maps_disk = extract(model, on_disk.train.images, model.feature_names, fc, r.cfg.seed, r._scheduler(dcfg),
                    progress=False, workers=1, batch_size=8)

from dcube.diffusion.sampling import sample_images  # noqa: E402
from dcube.diffusion.zeroshot import classify_zero_shot  # noqa: E402

samples = sample_images(model, dcfg, torch.tensor([0, 1, 0, 1, 1]), steps=3, seed=5, batch_size=2, progress=False)
zs = classify_zero_shot(model, r._scheduler(dcfg), images[:5], ZS, seed=3, progress=False)
from dcube.latent.autoencoder import load_codec, train_autoencoder  # noqa: E402

recording = False
torch.manual_seed(RANK)  # a different initialisation per rank: rank 0's is broadcast
ae = train_autoencoder(LatentConfig(**AE), images, WORK / "ae", seed=3, **AE_TRAIN)
latents = load_codec(ae).encode_all(images, batch_size=4, progress=False)
save_tensors(WORK / "gathered.safetensors", {**{f"feat.{k}": v for k, v in maps.items()},
                                             **{f"featdisk.{k}": v for k, v in maps_disk.items()},
                                             "samples": samples, "zs": zs.probs, "latents": latents})
if RANK == 1:
    (WORK / "audit-rank1.json").write_text(json.dumps(written))
