"""The accuracy protocol at full length, for one GPU (issue 15): `python -m bench.gpu`.

    python -m bench.gpu [--budget-s 540] [--datasets ...] [--methods ...] [--seeds 0 1 2] [--compile]
    python -m bench.gpu --table-only

What the 2-core CPU machine cannot run: step 1 until its validation probe stops improving
(``diffusion.epochs: auto``, the paper trains 280-950 epochs), step 2 and the baselines for the
MedMNIST v2 schedule (100 epochs, LR x0.1 at 50 % and 75 %), on BreastMNIST, PneumoniaMNIST (28 px,
official splits) and the COVID-19 Radiography subset at 128 px (the split of ``bench.covid``); 3 seeds.
Every choice is made on validation; the test split is read once per run, at the end.

On the device machine (the `device` tool) run it as ``DCUBE_BENCH_OUT=$OUT python -m bench.gpu``: one JSON
per run lands under ``$OUT/results/gpu/`` and comes back; run directories (checkpoints) stay on the
device's local disk (``--work``). Jobs run in PLAN order, most informative first (BreastMNIST, where
ResNet-18 beats D-Cube today, then PneumoniaMNIST, then COVID); a job starts only while the elapsed
time is under ``--budget-s``, so a 10-minute device slot ends with whole results, and the next slot
skips what is done. bf16 autocast and channels-last are on for D-Cube (``compute`` section);
``--compile`` adds torch.compile for step 1.

Without a GPU (``--device cpu``) it runs too, for the smoke test (DCUBE_BENCH_SMOKE=1: tiny data and schedules).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

from bench.common import (RESULTS, SMOKE, STATS, add_budget_arg, ci_cell, load_results, machine, mean_std, paired_cell,
                          run_study, shared_data, shrink, smoke_epochs)

STUDY = "gpu"
DATASETS = ("breastmnist", "pneumoniamnist", "covid")
# cnn-only: the control arm of bench.controls (the D-Cube head on EfficientNet-Lite0, no diffusion input) at the
# same full step-2 schedule, side by side with D-Cube so that a cut-short slot still pairs them
METHODS = ("dcube", "cnn-only", "resnet18", "efficientnet-lite0", "resnet50")
BASELINE_EPOCHS = 100  # MedMNIST v2
# D-Cube: step 1 until the validation probe stops improving (capped), step 2 as long as the baselines
DCUBE = {
    "breastmnist": {"diffusion": {"epochs": "auto", "max_steps": 3600, "patience": 8, "checkpoint_every": 45,
                                  "batch_size": 64},
                    "classifier": {"epochs": 100, "batch_size": 64}},
    "pneumoniamnist": {"diffusion": {"epochs": "auto", "max_steps": 14800, "patience": 6, "checkpoint_every": 370,
                                     "batch_size": 128},
                       "classifier": {"epochs": 50, "batch_size": 128}},
    "covid": {"diffusion": {"epochs": "auto", "max_steps": 6300, "patience": 6, "checkpoint_every": 210,
                            "batch_size": 64, "preset": "small"},
              "classifier": {"epochs": 30, "batch_size": 64},
              # 128 px: the head's maps stored at the fuse size (16), not as 128x128 layers (64x the disk)
              "features": {"map_size": 16}},
}
GPU_COMPUTE = {"mixed_precision": "bf16", "channels_last": True}


def data_dict(dataset: str) -> dict:
    if dataset == "covid":
        from bench.covid import data_dict as covid_data

        return {**covid_data(128), "download": False}
    return {"name": dataset, "path": str(shared_data() / "medmnist" / f"{dataset}.npz"), "download": False}


def dcube_job(dataset: str, seed: int, device: str, work: Path, compile_: bool, arm: str = "dcube") -> dict:
    from dcube.config import from_dict
    from dcube.pipeline import run
    from dcube.utils.io import read_json

    sched = DCUBE[dataset]
    values = shrink({"run_dir": str(work / f"{dataset}-{arm}-s{seed}"), "seed": seed, "device": device,
                     "data": data_dict(dataset), **{k: dict(v) for k, v in sched.items()},
                     "compute": {**(GPU_COMPUTE if device == "cuda" else {}), "compile": compile_}})
    if SMOKE:  # shrink's max_steps caps step 1; auto needs a probe step inside it
        values["diffusion"].update(checkpoint_every=1)
    if arm == "cnn-only":
        values["classifier"] = {**values["classifier"], "diffusion_features": False}
    cfg = from_dict(values)
    out = run(cfg)
    hist_path = Path(cfg.run_dir) / "diffusion" / "history.json"
    hist = read_json(hist_path) if hist_path.exists() else {}
    return {"study": STUDY, "dataset": dataset, "method": "D-Cube" if arm == "dcube" else
            "CNN-only (the D-Cube head on EfficientNet-Lite0)", "seed": seed, "schedule": sched,
            "config": cfg.to_dict(), "data_config": cfg.to_dict()["data"], "test": out["test"], "val": out["val"],
            "test_probs": out["test_probs"], "best_epoch": out["best_epoch"], "layers": out["layers"],
            "step1_chosen_step": hist.get("chosen_step"), "step1_steps": hist.get("steps"),
            "stage_seconds": out["timings_s"]}


def baseline_job(dataset: str, method: str, seed: int, device: str, work: Path) -> dict:
    from bench.baselines import run_baseline
    from dcube.config import DataConfig
    from dcube.data import load_data

    dc = shrink({"data": data_dict(dataset)})["data"]
    data = load_data(DataConfig(**dc), seed)
    out = run_baseline(method, data, work / f"{dataset}-{method}-s{seed}", seed, smoke_epochs(BASELINE_EPOCHS),
                       threads=os.cpu_count() or 1, device=device)
    return {"study": STUDY, "dataset": dataset, "data": data.info, "data_config": dc, **out}


def plan(datasets, methods, seeds) -> list[tuple[str, str, int]]:
    """Dataset-major (the first dataset is complete before the next starts), D-Cube and ResNet-18 of a seed
    side by side, so a cut-short slot still leaves paired rows."""
    return [(d, m, s) for d in datasets for s in seeds for m in methods]


def table() -> str:
    rows = load_results(STUDY)
    lines = ["## Full-length schedules on one GPU\n",
             "Command: `DCUBE_BENCH_OUT=$OUT python -m bench.gpu` on the device machine (resumable, `--budget-s`). "
             "D-Cube: step 1 with `diffusion.epochs: auto` (validation probe; cap and patience in `bench/gpu.py`), "
             "step 2 and the baselines 100 epochs (MedMNIST v2 schedule; COVID: 30). Best epoch chosen on "
             "validation; CI of the seed mean and the paired seed-mean difference against ResNet-18 of this study "
             f"on the same test images: {STATS}.\n"]
    if not rows:
        return "\n".join(lines + ["No run yet: no GPU has been lent to a session since this study was written."])
    lines += ["| dataset | method | seeds | test ACC | test AUC | AUC 95 % CI | vs ResNet-18 (AUC, paired) | machine | date |",
              "|---|---|---|---|---|---|---|---|---|"]
    for ds in DATASETS:
        runs = [r for r in rows if r["dataset"] == ds]
        ref = sorted((r for r in runs if r["method"] == "ResNet-18"), key=lambda r: r["seed"])
        for method in dict.fromkeys(r["method"] for r in runs):
            rs = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
            paired = [r for r in rs if r["seed"] in {q["seed"] for q in ref}]
            vs = "-" if method == "ResNet-18" or not paired else paired_cell(
                paired, [q for q in ref if q["seed"] in {r["seed"] for r in paired}])
            lines.append(f"| {ds} | {method} | {len(rs)} | {mean_std([r['test']['accuracy'] for r in rs])} | "
                         f"{mean_std([r['test']['auc'] for r in rs])} | {ci_cell(rs)} | {vs} | "
                         f"{rs[-1].get('machine', machine())[:40]} | {rs[-1]['date']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add_budget_arg(p, 540.0)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser for step 1")
    p.add_argument("--work", default=None, help="run directories (default: a temporary folder)")
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)

    def jobs():  # a generator: with --table-only, torch is never imported
        import torch

        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        work = Path(a.work) if a.work else (RESULTS / STUDY / "runs" if SMOKE else
                                            Path(tempfile.gettempdir()) / "dcube-bench-gpu")
        for ds, m, seed in plan(a.datasets, a.methods, a.seeds):
            fn = (partial(dcube_job, ds, seed, device, work, a.compile, m) if m in ("dcube", "cnn-only")
                  else partial(baseline_job, ds, m, seed, device, work))
            yield f"{ds}-{m}-s{seed}", fn

    return run_study(STUDY, jobs(), table, a.table_only, a.budget_s)

if __name__ == "__main__":
    sys.exit(main())
