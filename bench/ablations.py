"""The paper's ablations on MedMNIST: which parts of D-Cube matter.

    python -m bench.ablations [--datasets breastmnist pneumoniamnist] [--seeds 0 1 2] [--variants ...]
    python -m bench.ablations --table-only

Chain (each row adds one part): baseline (step 1 without the contrastive loss, the last block's
features only, cross-entropy only, no sub-features) -> + contrastive loss -> + KS selection ->
+ cycle loss -> + sub-features (EfficientNet-Lite0) -> + flip consistency (= full D-Cube).
Then, from full D-Cube: the KS "worst" (most Gaussian) layers, noised input x_t at several t, and
the sub-feature CNN (ResNet-18 from scratch, none). Two step-1 models per dataset and seed (with /
without the contrastive loss) are trained once and shared by the variants (the directory is
copied). Same schedules as `bench.accuracy`; best epoch on validation.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from functools import partial

from bench.accuracy import SCHEDULES, data_path
from bench.common import RESULTS, THREADS, load_results, machine, mean_std, run_study, shrink

STUDY = "ablations"
LAST = "<last block>"  # replaced by the step-1 model's last block name
PLAIN = {"cycle_weight": 0.0, "consistency_weight": 0.0, "subfeature": "none"}
# key -> (label, step-1 model, features overrides, classifier overrides)
VARIANTS = {
    "1_baseline": ("baseline: no contrastive, last block only, CE only", "nocon", {"layers": [LAST]}, PLAIN),
    "2_contrastive": ("+ contrastive loss (step 1)", "con", {"layers": [LAST]}, PLAIN),
    "3_ks": ("+ KS feature selection", "con", {}, PLAIN),
    "4_cycle": ("+ cycle loss", "con", {}, {**PLAIN, "cycle_weight": 0.1}),
    "5_subfeatures": ("+ sub-features (EfficientNet-Lite0, ImageNet)", "con", {}, {"consistency_weight": 0.0}),
    "6_full": ("+ flip consistency = full D-Cube", "con", {}, {}),
    "ks_worst": ("full, KS 'worst' (most Gaussian) layers", "con", {"ks_keep": "most_gaussian"}, {}),
    "select_probe": ("full, layers chosen by a linear probe (training split; dcube's option)", "con",
                     {"select": "probe"}, {}),
    "xt_50": ("full, input x_t, t = 50", "con", {"input_mode": "xt", "timestep": 50}, {}),
    "xt_200": ("full, input x_t, t = 200", "con", {"input_mode": "xt", "timestep": 200}, {}),
    "xt_500": ("full, input x_t, t = 500", "con", {"input_mode": "xt", "timestep": 500}, {}),
    "sub_resnet18": ("full, sub-features ResNet-18 (from scratch)", "con", {}, {"subfeature": "resnet18"}),
    "sub_none": ("full, no sub-features", "con", {}, {"subfeature": "none"}),
}
ARCHIVED = {"select_probe"}  # removed in dcube 1.0 (CHANGELOG.md): stored rows stay in the table, no new runs
STEP1 = {"con": {}, "nocon": {"contrastive_weight": 0.0}}


def _base(dataset: str, seed: int, run_dir, step1: str) -> dict:
    sched = SCHEDULES[dataset]
    return shrink({"run_dir": str(run_dir), "seed": seed, "threads": THREADS,
                   "data": {"name": dataset, "path": data_path(dataset), "download": False},
                   "diffusion": {**sched["diffusion"], **STEP1[step1]},
                   "classifier": dict(sched["classifier"])})


def step1_dir(dataset: str, step1: str, seed: int):
    """Train (once) the shared step-1 model -> its run directory."""
    from dcube.config import from_dict
    from dcube.pipeline import DCube

    d = RESULTS / STUDY / "runs" / f"{dataset}-step1-{step1}-s{seed}"
    with DCube(from_dict(_base(dataset, seed, d, step1))) as r:  # releases the run-dir lock for other jobs
        r.train_diffusion()
    return d


def variant_run(dataset: str, key: str, seed: int) -> dict:
    from dcube.config import from_dict
    from dcube.diffusion.trainer import load_denoiser
    from dcube.pipeline import run

    label, step1, feats, clf = VARIANTS[key]
    src = step1_dir(dataset, step1, seed)
    dst = RESULTS / STUDY / "runs" / f"{dataset}-{key}-s{seed}"
    if not (dst / "diffusion").exists():
        shutil.copytree(src / "diffusion", dst / "diffusion")
    if LAST in feats.get("layers", []):
        model, _ = load_denoiser(dst / "diffusion" / "ema.safetensors")
        feats = {**feats, "layers": [model.feature_names[-1]]}
    cfg = _base(dataset, seed, dst, step1)
    cfg["features"] = {**cfg.get("features", {}), **feats}
    cfg["classifier"] = {**cfg["classifier"], **clf}
    out = run(from_dict(cfg))
    return {"study": STUDY, "dataset": dataset, "variant": key, "label": label, "seed": seed,
            "config": cfg, "test": out["test"], "val": out["val"], "test_probs": out["test_probs"],
            "layers": out["layers"],
            "best_epoch": out["best_epoch"]}


def table() -> str:
    rows = load_results(STUDY)
    lines = ["## Ablations (the paper's, on MedMNIST 28 px)\n",
             f"Command: `python -m bench.ablations` (resumable). Machine: {machine()}. Schedules as in the accuracy "
             "study (shortened); best epoch on validation AUC; mean ± std over the seeds listed. Minority recall: "
             "recall of the class with the fewest test images. These rows are one seed each and ran the defaults of "
             "their date (dcube 0.1: pooled KS, softmax scores, fuse 8, cycle x0.1); no default is chosen from them. "
             "The 3-seed, paired comparisons of today's parts (layer selection, cycle loss, head, several timesteps, "
             "sub-feature CNN) on validation and test are in \"Step 2, part by part\" (`bench.step2`).\n"]
    for ds in SCHEDULES:
        runs = [r for r in rows if r["dataset"] == ds]
        if not runs:
            continue
        lines += [f"\n### {ds}\n", "| variant | seeds | val AUC | test ACC | test AUC | macro-F1 | minority recall | layers (seed 0) | date |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key, (label, *_rest) in VARIANTS.items():
            rs = [r for r in runs if r["variant"] == key]
            if not rs:
                continue
            minority = min(rs[0]["test"]["per_class"], key=lambda c: rs[0]["test"]["per_class"][c]["support"])
            lines.append(f"| {label} | {len(rs)} | {mean_std([r['val']['auc'] for r in rs])} | "
                         f"{mean_std([r['test']['accuracy'] for r in rs])} | "
                         f"{mean_std([r['test']['auc'] for r in rs])} | {mean_std([r['test']['f1_macro'] for r in rs])} | "
                         f"{mean_std([r['test']['per_class'][minority]['recall'] for r in rs])} | "
                         f"{', '.join(rs[0]['layers'])} | {', '.join(sorted({r['date'] for r in rs}))} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["breastmnist", "pneumoniamnist"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    runnable = [k for k in VARIANTS if k not in ARCHIVED]
    p.add_argument("--variants", nargs="+", choices=runnable, default=runnable)
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    jobs = ((f"{ds}-{key}-s{seed}", partial(variant_run, ds, key, seed))
            for ds in a.datasets for seed in a.seeds for key in a.variants)
    return run_study(STUDY, jobs, table, a.table_only)


if __name__ == "__main__":
    sys.exit(main())
