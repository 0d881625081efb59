"""Kill anywhere, resume to the same result (issue 14): `dcube run` is SIGKILLed ten times, at points
spread over step 1, the KS selection, feature extraction, the cycle loss and
step 2; each time the same command resumes. The final metrics.json equals an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

# outputs in the order a run writes them; a kill is aimed just after one appears (plus a random delay)
MILESTONES = ["config.yaml", "diffusion/last.safetensors", "diffusion/ema.safetensors", "features/selection.json",
              "features/train.safetensors", "features/val.safetensors",
              "classifier/last.safetensors", "classifier/best.safetensors", "classifier/history.json"]


def _config(shared_data, run_dir: Path) -> dict:
    return {"run_dir": str(run_dir), "seed": 0, "threads": 1,
            "data": {"name": "pneumoniamnist", "path": str(shared_data / "medmnist" / "pneumoniamnist.npz"),
                     "download": False, "max_train": 48, "max_val": 24, "max_test": 24},
            "diffusion": {"preset": "micro", "max_steps": 6, "checkpoint_every": 2, "batch_size": 16,
                          "sample_grid": False},
            "classifier": {"subfeature": "none", "epochs": 3, "batch_size": 16, "cycle_weight": 1.0}}


def _cmd(cfg_path: Path) -> list[str]:
    return [sys.executable, "-m", "dcube.cli", "run", str(cfg_path)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _metrics(run_dir: Path) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    m.pop("timings_s", None)
    return m


def test_sigkill_at_ten_points_then_resume_gives_the_uninterrupted_metrics(shared_data, tmp_path):
    ref_cfg = tmp_path / "ref.yaml"
    ref_cfg.write_text(yaml.safe_dump(_config(shared_data, tmp_path / "ref")))
    ref = subprocess.Popen(_cmd(ref_cfg), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # alongside

    run_dir = tmp_path / "killed"
    cfg = tmp_path / "killed.yaml"
    cfg.write_text(yaml.safe_dump(_config(shared_data, run_dir)))
    rng = random.Random(14)
    kills, where = 0, []
    for target in MILESTONES:
        proc = subprocess.Popen(_cmd(cfg), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while proc.poll() is None and not (run_dir / target).exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
            where.append(target)
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()[-2000:]
        if (run_dir / "metrics.json").exists():
            break
    assert kills >= 8, f"only {kills} kills landed ({where}): the run finished too early"
    done = subprocess.run(_cmd(cfg), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ref.wait() == 0, ref.stderr.read().decode()[-2000:]
    assert _metrics(run_dir) == _metrics(tmp_path / "ref"), where


def test_sigkill_during_synthesis_then_rerun_gives_the_same_set(shared_data, tmp_path):
    """`dcube synthesize` killed while sampling or writing: the manifest is written last, so the rerun makes
    the whole set again, byte for byte the set of an uninterrupted run."""
    from dcube.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_config(shared_data, tmp_path / "run")))
    assert main(["train-diffusion", str(cfg)]) == 0
    synth = [sys.executable, "-m", "dcube.cli", "synthesize", str(cfg), "--per-class", "60", "--steps", "10",
             "--batch-size", "60"]
    assert main(synth[3:] + ["--out", str(tmp_path / "ref")]) == 0  # the uninterrupted set, in this process
    out = tmp_path / "killed"
    # once while starting or sampling, then while the PNGs are being written: killed as soon as the first PNG
    # is there. On a loaded machine that kill can land after the last PNG or even the manifest, so the writing
    # kill is tried again on an empty folder (up to 5 times) until it leaves a partial set.
    def kill(when: str) -> None:
        proc = subprocess.Popen(synth + ["--out", str(out)], env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if when == "sampling":
            time.sleep(random.Random(3).uniform(1.0, 2.5))
        else:
            deadline = time.time() + 120
            while not (out.exists() and next(out.rglob("*.png"), None)) and proc.poll() is None \
                    and time.time() < deadline:
                time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    kill("sampling")
    assert not (out / "manifest.csv").exists(), "the kill while sampling came too late"
    for attempt in range(5):
        if attempt:
            shutil.rmtree(out)
        kill("writing")
        if not (out / "manifest.csv").exists() and len(list(out.rglob("*.png"))) < 120:
            break
    assert not (out / "manifest.csv").exists(), "every kill while writing came after the manifest"
    assert 0 < len(list(out.rglob("*.png"))) < 120  # the kill while writing left a partial set
    assert subprocess.run(synth + ["--out", str(out)], env=_env(), capture_output=True).returncode == 0
    ref = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*.png"))
    got = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert ref == got and len(ref) == 120
    assert all((tmp_path / "ref" / p).read_bytes() == (out / p).read_bytes() for p in ref)
    assert (tmp_path / "ref" / "manifest.csv").read_text() == (out / "manifest.csv").read_text()
