"""Two CPU processes (torchrun, gloo) against one: the same features, predictions and metrics,
step 1 close to the one-process run, files from rank 0 only, and a 2-process run resumed by 1."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from dcube.config import LatentConfig, from_dict
from dcube.diffusion.zeroshot import ZeroShotOptions

WORKER = Path(__file__).with_name("worker.py")
AE = dict(ae_channels=[16, 16], ae_epochs=1)
AE_TRAIN = dict(batch_size=7, crop=8, max_steps=3)  # an odd batch split over 2 ranks, random crops
ZS = ZeroShotOptions(trials=3, batch_size=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(work: Path) -> dict:
    return {
        "run_dir": str(work / "run"), "seed": 0, "device": "cpu",
        "data": {"source": "folder", "path": str(work / "imgs"), "image_size": 16, "val_fraction": 0.2,
                 "test_fraction": 0.2},
        "diffusion": {"backbone": "uvit", "preset": "micro", "epochs": 3, "max_steps": 4, "batch_size": 10,
                      "sample_grid": False, "checkpoint_every": 2},
        "features": {"input_mode": "xt", "timestep": 100},
        # batch 40: its first 32 rows (CONSISTENCY_BATCH) also classified flipped, split unevenly over the ranks
        "classifier": {"subfeature": "none", "epochs": 2, "batch_size": 40},
                "compute": {"grad_accum": 2},
    }


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist")
    g = torch.Generator().manual_seed(0)
    for c, base in (("a", 60), ("b", 190)):
        (work / "imgs" / c).mkdir(parents=True)
        for i in range(41):
            px = (base + torch.randint(-40, 40, (16, 16), generator=g)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(px.numpy()).save(work / "imgs" / c / f"{i}.png")
    (work / "config.json").write_text(json.dumps(_config(work)))
    (work / "config.yaml").write_text(yaml.safe_dump(_config(work)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), str(work)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return work, done.stdout


def _run(work):
    from dcube.pipeline import DCube

    torch.set_num_threads(1)
    return DCube(from_dict(_config(work)))


def test_two_process_pipeline_writes_its_outputs(two_procs):
    work, _ = two_procs
    for f in ("diffusion/ema.safetensors", "diffusion/last.safetensors", "features/selection.json",
              "classifier/best.safetensors", "classifier/history.json", "metrics.json"):
        assert (work / "run" / f).exists(), f


def test_rank1_writes_nothing(two_procs):
    work, _ = two_procs
    assert json.loads((work / "audit-rank1.json").read_text()) == []


def test_gathered_results_equal_one_process(two_procs):
    """Features, samples and zero-shot scores gathered from 2 ranks = one process, bit for bit."""
    from dcube.diffusion.sampling import sample_images
    from dcube.features import extract
    from dcube.diffusion.zeroshot import classify_zero_shot
    from dcube.utils.io import load_tensors

    work, _ = two_procs
    got, _ = load_tensors(work / "gathered.safetensors")
    r = _run(work)
    model, dcfg = r.denoiser()
    images = r.data.train.images
    assert len(images) % 2 == 1 or len(images) % 8  # shards of unequal size
    maps = extract(model, images, model.feature_names, r.cfg.features, r.cfg.seed, r._scheduler(dcfg),
                   progress=False, batch_size=8)
    for name, m in maps.items():
        assert torch.equal(got[f"feat.{name}"], m), name
        assert torch.equal(got[f"featdisk.{name}"], m), name  # 2 ranks reading the uint8 store by rows
    samples = sample_images(model, dcfg, torch.tensor([0, 1, 0, 1, 1]), steps=3, seed=5, batch_size=2,
                            progress=False)
    assert torch.equal(got["samples"], samples)
    zs = classify_zero_shot(model, r._scheduler(dcfg), images[:5], ZS, seed=3, progress=False)
    assert torch.equal(got["zs"], zs.probs)


def test_autoencoder_on_two_processes_matches_one(two_procs, tmp_path):
    from dcube.latent.autoencoder import load_codec, train_autoencoder
    from dcube.utils.io import load_tensors

    work, _ = two_procs
    images = _run(work).data.train.images
    torch.manual_seed(0)
    path = train_autoencoder(LatentConfig(**AE), images, tmp_path, seed=3, **AE_TRAIN)
    a, b = load_tensors(path)[0], load_tensors(work / "ae" / "autoencoder.safetensors")[0]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    got, _ = load_tensors(work / "gathered.safetensors")
    ref = load_codec(work / "ae" / "autoencoder.safetensors").encode_all(images, batch_size=4, progress=False)
    assert torch.equal(got["latents"], ref)


def test_metrics_equal_one_process_on_the_same_predictions(two_procs):
    from dcube.classify.trainer import BEST, build_head, head_probabilities
    from dcube.evaluate import compute_metrics
    from dcube.evaluate.stats import bootstrap_ci
    from dcube.utils.io import load_checkpoint, read_json

    work, _ = two_procs
    r = _run(work)
    names = r.select_layers()
    model, dcfg = r.denoiser()
    test = r.feature_split("test", names, model, dcfg)
    head = build_head(r.cfg.classifier, test, 2)
    load_checkpoint(work / "run" / "classifier" / BEST, {"head": head})
    probs = head_probabilities(head, test)
    metrics = compute_metrics(test.labels.numpy(), probs.numpy(), r.data.class_names)
    metrics["ci95"] = bootstrap_ci(test.labels.numpy(), probs.numpy(), seed=r.cfg.seed)
    assert read_json(work / "run" / "metrics.json")["test"] == json.loads(json.dumps(metrics))


def test_step1_on_two_processes_matches_one(two_procs, tmp_path):
    """Sharded batches + averaged gradients (and 2 micro-batches per rank) = the whole batch."""
    from dcube.diffusion.trainer import train_diffusion
    from dcube.utils.io import load_tensors

    work, _ = two_procs
    r = _run(work)
    d = r.data
    torch.manual_seed(0)
    one = train_diffusion(r.cfg.diffusion, d.train.images, d.train.labels, 2, tmp_path, seed=0)
    a, _ = load_tensors(one)
    b, _ = load_tensors(work / "run" / "diffusion" / "ema.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), k


def test_two_process_checkpoint_resumes_with_one(two_procs, capsys):
    from dcube.diffusion.trainer import FINAL, train_diffusion
    from dcube.utils.io import load_tensors, read_json

    work, _ = two_procs
    r = _run(work)
    d = r.data
    cfg = r.cfg.diffusion
    cfg.max_steps = 6
    ddir = work / "run" / "diffusion"
    assert load_tensors(ddir / "last.safetensors")[1]["step"] == 4
    train_diffusion(cfg, d.train.images, d.train.labels, 2, ddir, seed=0)
    assert "resuming from step 4" in capsys.readouterr().out
    assert read_json(ddir / "history.json")["steps"] == 6
    assert load_tensors(ddir / FINAL)[1]["step"] == 6
