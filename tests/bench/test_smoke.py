"""Every benchmark study runs end to end on a tiny slice (DCUBE_BENCH_SMOKE=1) and writes its JSON results,
its page and its BENCHMARKS.md entry into a scratch folder (DCUBE_BENCH_OUT); an archived study regenerates
its page from its stored JSON and refuses to run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUDIES = {
    "accuracy": ["--datasets", "breastmnist", "--seeds", "0", "--methods", "dcube", "dcube-resnet18", "dcube-auto",
                 "dcube-uvit", "linear-probe", "resnet18"],
    "covid": ["--seeds", "0", "--methods", "resnet18", "dcube"],
    "controls": ["--datasets", "breastmnist", "--seeds", "3", "4", "--arms", "dcube", "cnn-only", "ks-worst"],
    "size_curve": ["--datasets", "breastmnist", "--seeds", "0", "--models", "unet-micro", "uvit-tiny"],
    "learning_curves": ["--datasets", "breastmnist", "--points", "10", "--seeds", "0", "1", "--arms", "dcube-pool",
                        "fixmatch"],
    "ablations": ["--datasets", "breastmnist", "--seeds", "0", "--variants", "1_baseline", "ks_worst"],
    "convergence": ["--seeds", "0", "--variants", "normalized", "untrained"],
    "robustness": ["--datasets", "breastmnist", "--seeds", "0", "--settings", "labels10", "--methods",
                   "dcube-unlabelled", "resnet18"],  # the few-label path with its pool, and the baseline
    "speed": ["--parts", "step1-unet-28", "step2-vs-step1"],
    "scaling": ["--procs", "1", "2", "--images", "32"],
    "rebalance": ["--seeds", "0", "--generators", "short", "long"],
    "gpu": ["--datasets", "breastmnist", "--seeds", "0", "--methods", "dcube", "cnn-only", "resnet18", "--device",
            "cpu"],
    "big_image": ["--size", "3000"],
    "reference": ["--against", "HEAD"],
    "scaling_data": ["--n", "120", "--modes", "disk"],
}


@pytest.mark.parametrize("study", list(STUDIES))
def test_study_runs_on_a_tiny_slice(study, shared_data, tmp_path):
    env = {**os.environ, "DCUBE_BENCH_SMOKE": "1", "DCUBE_BENCH_OUT": str(tmp_path), "DCUBE_SHARED_DATA": str(shared_data),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", f"bench.{study}", *STUDIES[study]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list((tmp_path / "results" / study).glob("*.json"))
    assert results, f"no result JSON for {study}"
    for r in results:
        rec = json.loads(r.read_text())
        assert rec["wall_s"] >= 0 and rec["versions"]["torch"] and rec["date"]
    assert f"<!-- {study}:begin -->" in (tmp_path / "BENCHMARKS.md").read_text()  # its entry in the index
    md = (tmp_path / "docs" / "benchmarks" / f"{study}.md").read_text()  # its page
    assert "command" in md.lower()
    assert not (ROOT / "bench" / "results" / study / "smoke").exists()
    if study == "accuracy":  # subfeature=auto's row: the candidate its rule keeps, from the candidates' runs
        auto = json.loads((tmp_path / "results" / study / "breastmnist-dcube-auto-s0.json").read_text())
        assert auto["chosen"] in auto["candidates"] and "chosen on validation" in md
        uvit = json.loads((tmp_path / "results" / study / "breastmnist-dcube-uvit-s0.json").read_text())
        assert uvit["config"]["diffusion"]["backbone"] == "uvit" and "D-Cube with a U-ViT step 1 minus" in md
    if study == "covid":  # D-Cube (64 px) and ResNet-18 (128 px) are paired on the same test images
        row = next(line for line in md.splitlines() if line.startswith("| **ResNet-18**"))
        assert "p = " in row and "[" in row, row
    if study == "controls":  # every arm paired with D-Cube by seed, Holm beside the raw p; CNN-only has no step 1
        row = next(line for line in md.splitlines() if line.startswith("| CNN-only"))
        assert "Holm p " in row and "2 (3, 4)" in row, row
        assert not (tmp_path / "results" / study / "runs" / "breastmnist-cnn-only-s3" / "diffusion").exists()
        worst = json.loads((tmp_path / "results" / study / "breastmnist-ks-worst-s3.json").read_text())
        assert worst["step1_from"] == "dcube" and worst["config"]["features"]["ks_keep"] == "most_gaussian"
        assert "Table VI" in md and "plot: controls.png" in md and (tmp_path / "results" / study / "controls.png").exists()
    if study == "learning_curves":  # the pool's arms paired with the others by seed; FixMatch saw the pool
        row = next(line for line in md.splitlines() if line.startswith("| 10 | FixMatch"))
        assert "Holm p " in row, row
        rec = json.loads((tmp_path / "results" / study / "breastmnist-k10-fixmatch-s0.json").read_text())
        assert rec["data_config"]["unlabelled_rest"] and rec["data_config"]["labelled_per_class"] == 10
    if study == "convergence":  # --grids: the finished default run's samples, drawn and shown; the others skipped
        grid = subprocess.run([sys.executable, "-m", "bench.convergence", "--grids", *STUDIES[study]], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert grid.returncode == 0, grid.stderr[-3000:]
        assert (tmp_path / "results" / study / "samples-breastmnist-normalized-s0.png").exists()
        assert "grid: samples-breastmnist-normalized-s0.png" in (tmp_path / "docs" / "benchmarks" / f"{study}.md").read_text()
        assert "samples-breastmnist-untrained" not in grid.stdout
    if study == "reference":  # the committed code and the work tree: the same run, the same numbers
        rec = json.loads((tmp_path / "results" / study / "HEAD.json").read_text())
        assert rec["before"]["test_probs"] and rec["max_prob_diff"] >= 0 and "| `HEAD` |" in md
    if study == "rebalance":  # each generator's sampler is the candidate of lowest TRAIN FID; arms are paired
        for gen in ("", "-long"):
            choice = json.loads((tmp_path / "results" / study / f"synthesis{gen}.json").read_text())["sampler_choice"]
            best = min(choice["candidates"], key=lambda c: c["mean_fid"])
            assert choice["chosen"] == [best["sampler"], best["steps"]]
        assert "real + long synthetic minus real: macro-F1" in md and "real + long synthetic minus real + short" in md


ARCHIVED = ["step2", "latent_covid"]  # studies whose settings left the code in dcube 1.0: pages from the JSON


@pytest.mark.parametrize("study", ARCHIVED)
def test_an_archived_study_regenerates_its_page_and_runs_nothing(study, tmp_path):
    import shutil

    shutil.copytree(ROOT / "bench" / "results", tmp_path / "results")  # its JSON and the studies it reads
    env = {**os.environ, "DCUBE_BENCH_OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", f"bench.{study}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "archived" in run.stderr
    table = subprocess.run([sys.executable, "-m", f"bench.{study}", "--table-only"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert table.returncode == 0, table.stderr[-2000:]
    page = (tmp_path / "docs" / "benchmarks" / f"{study}.md").read_text()
    stored = (ROOT / "docs" / "benchmarks" / f"{study}.md").read_text()
    rows = [line for line in stored.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 10 and all(row in page for row in rows if "Machine" not in row)  # the same table


def test_the_heatmaps_study_runs_on_a_tiny_finished_run(shared_data, tmp_path):
    """bench.heatmaps reads a finished chest X-ray run (the demo's by default): here a tiny one."""
    from dcube.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
run_dir: {tmp_path / 'run'}
threads: 1
data: {{name: pneumoniamnist, path: {shared_data / 'medmnist' / 'pneumoniamnist.npz'}, download: false,
        max_train: 64, max_val: 32, max_test: 32}}
diffusion: {{preset: micro, max_steps: 2, batch_size: 16, sample_grid: false}}
classifier: {{epochs: 1, batch_size: 16}}
""")
    assert main(["run", str(cfg)]) == 0
    env = {**os.environ, "DCUBE_BENCH_OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench.heatmaps", "--run-dir", str(tmp_path / "run"), "--images", "4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(next((tmp_path / "out" / "results" / "heatmaps").glob("*.json")).read_text())
    page = (tmp_path / "out" / "docs" / "benchmarks" / "heatmaps.md").read_text()
    assert rec["wall_s"] >= 0 and "Command" in page and (tmp_path / "out" / "results" / "heatmaps" / "run-panel.png").exists()


STUB_UVIT = '''
import torch


class UViT(torch.nn.Module):  # the reference's constructor and call, not its network
    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, mlp_time_embed,
                 num_classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_chans, in_chans, 3, padding=1)
        self.label = torch.nn.Embedding(num_classes, in_chans)

    def forward(self, x, timesteps, y):
        return self.conv(x) + self.label(y)[:, :, None, None]
'''


def test_the_uvit_reference_study_runs_on_a_stub_reference(tmp_path):
    """bench.uvit_reference imports the reference U-ViT from a checkout (nothing is downloaded): here a stub
    with its constructor and call, so the timing harness, its JSON and its page run end to end."""
    libs = tmp_path / "ref" / "libs"
    libs.mkdir(parents=True)
    (libs / "__init__.py").write_text("")
    (libs / "uvit.py").write_text(STUB_UVIT)
    env = {**os.environ, "DCUBE_BENCH_SMOKE": "1", "DCUBE_BENCH_OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench.uvit_reference", "--reference", str(tmp_path / "ref")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "out" / "results" / "uvit_reference" / "run.json").read_text())
    assert set(rec["median_images_per_s"]) == {"reference", "dcube", "dcube, bf16"}
    assert all(v > 0 for v in rec["median_images_per_s"].values())
    assert "| reference |" in (tmp_path / "out" / "docs" / "benchmarks" / "uvit_reference.md").read_text()
