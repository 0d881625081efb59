"""Rebalancing study: does topping up the minority class with D-Cube step-1 samples help a plain CNN?

BreastMNIST (28 px, official split; minority = malignant, 147 of 546 training images). One
step-1 model is trained on the TRAIN split only; DDIM samples top malignant up to the benign
count; a ResNet-18 (MONAI, MedMNIST 28-px stem) is trained on real vs real + synthetic images,
several seeds each, best epoch on validation AUC, test metrics reported.

    python -m bench.rebalance                 # resumable: finished runs are skipped
    python -m bench.rebalance --table-only    # regenerate the BENCHMARKS.md section

Schedules are shortened to fit a shared 2-core CPU (see SCHEDULE); the table says so.
Outputs: bench/results/rebalance/{synthesis,<arm>-s<seed>}.json (committed); checkpoints,
PNG samples and the real-vs-generated grid under bench/results/rebalance/runs/ (ignored).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import torch

from bench.accuracy import data_path
from bench.common import RESULTS, SMOKE, load_results, machine, mean_std, run_study, shrink

STUDY = "rebalance"
RUNS = RESULTS / STUDY / "runs"
SCHEDULE = {
    "diffusion": {"backbone": "unet", "preset": "tiny", "epochs": 15, "batch_size": 32, "lr": 1e-3,
                  "class_dropout": 0.1, "sample_grid": False, "checkpoint_every": 50},
    "sampling": {"sampler": "ddim", "steps": 50, "guidance": 0.0, "seed": 0, "batch_size": 250,
                 "images": 1000, "minority_share": 0.6},
    "baseline": {"model": "resnet18", "epochs": 8, "batch_size": 64, "lr": 1e-3},
}
if SMOKE:  # a tiny slice, seconds: the smoke test of this study
    SCHEDULE = {"diffusion": {**SCHEDULE["diffusion"], "preset": "micro", "epochs": 1, "max_steps": 2},
                "sampling": {**SCHEDULE["sampling"], "steps": 2, "images": 24, "batch_size": 24},
                "baseline": {**SCHEDULE["baseline"], "epochs": 1}}
COMMAND = "nohup .venv/bin/python -m bench.rebalance > bench/results/rebalance/log.txt 2>&1 &"


def bundle():
    from dcube.config import DataConfig
    from dcube.data import load_data

    dc = shrink({"data": {"name": "breastmnist", "path": data_path("breastmnist"), "download": False}})["data"]
    return load_data(DataConfig(**dc), seed=0)


def step1(data):
    from dcube.config import DiffusionConfig
    from dcube.diffusion.trainer import train_diffusion

    cfg = DiffusionConfig(**SCHEDULE["diffusion"])
    return train_diffusion(cfg, data.train.images, data.train.labels, data.num_classes, RUNS / "step1", seed=0)


def synthesis(data) -> dict:
    """1000 DDIM-50 samples (timed): the top-up images, per-class FID/KID and the grid."""
    from dcube.evaluate.fidelity import format_fidelity, per_class_fidelity
    from dcube.generate import balance_counts, synthesize
    from dcube.generate.grid import save_real_vs_generated
    from dcube.generate.synthetic import train_fingerprint

    ckpt = step1(data)
    s = SCHEDULE["sampling"]
    counts = data.train.labels.bincount().tolist()
    minority = min(range(len(counts)), key=counts.__getitem__)
    topup = balance_counts(counts)
    n_min = max(topup[minority], round(s["images"] * s["minority_share"]))
    gen_counts = [n_min if c == minority else s["images"] - n_min for c in range(len(counts))]
    t0 = time.time()
    synth = synthesize(ckpt, gen_counts, RUNS / "synthetic", data.class_names, train_fingerprint(data.train),
                       sampler=s["sampler"], steps=s["steps"], guidance=s["guidance"], seed=s["seed"],
                       batch_size=s["batch_size"], overwrite=True)
    wall = time.time() - t0
    fid = per_class_fidelity(data.train.images, data.train.labels, synth.images, synth.labels, data.class_names)
    print(format_fidelity(fid))
    save_real_vs_generated(data.train.images, data.train.labels, synth.images, synth.labels, data.class_names,
                           RUNS / "real_vs_generated.png")
    return {"study": STUDY, "kind": "synthesis", "schedule": SCHEDULE, "generated_counts": gen_counts,
            "train_counts": counts, "minority": data.class_names[minority], "topup_counts": topup,
            "sampling_seconds": synth.info["sampling_seconds"], "synthesize_wall_s": round(wall, 1),
            "threads": torch.get_num_threads(), "fidelity": fid, "synthetic_info": synth.info}


def topup_set(data):
    """The synthetic images actually added: the first `topup` minority images of the set."""
    from dcube.generate import SyntheticSet, balance_counts, load_synthetic

    full = load_synthetic(RUNS / "synthetic")
    topup = balance_counts(data.train.labels.bincount().tolist())
    keep = torch.cat([torch.nonzero(full.labels == c).flatten()[:k] for c, k in enumerate(topup)])
    return SyntheticSet(full.images[keep], full.labels[keep], [full.ids[i] for i in keep.tolist()],
                        full.class_names, full.info)


def train_arm(data, arm: str, seed: int) -> dict:
    from dcube.classify.baseline import BaselineConfig, train_baseline
    from dcube.evaluate import compute_metrics, select_score

    cfg = BaselineConfig(**SCHEDULE["baseline"])
    synth = topup_set(data) if arm == "real+synthetic" else None
    score = lambda y, p: select_score(compute_metrics(y, p, data.class_names), "auc")  # noqa: E731
    out = train_baseline(cfg, data, RUNS / f"{arm.replace('+', '_')}-s{seed}", score, seed=seed, synthetic=synth)
    test = compute_metrics(data.test.labels, out["test_probs"], data.class_names)
    return {"study": STUDY, "kind": "arm", "arm": arm, "seed": seed, "schedule": SCHEDULE["baseline"],
            "best_epoch": out["best_epoch"], "val_auc": out["val_score"], "history": out["history"],
            "n_train_real": out["n_train_real"], "n_train_synthetic": out["n_train_synthetic"],
            "train_seconds": out["train_seconds"], "test": test}


def table() -> str:
    rows = load_results(STUDY)
    syn = next((r for r in rows if r.get("kind") == "synthesis"), None)
    arms = [r for r in rows if r.get("kind") == "arm"]
    sd, sb = SCHEDULE["diffusion"], SCHEDULE["baseline"]
    lines = ["## Rebalancing BreastMNIST with synthetic malignant images\n",
             f"Command: `{COMMAND}` (resumable; one JSON per run in `bench/results/rebalance/`; "
             "`python -m bench.rebalance --table-only` regenerates this section). "
             f"Machine: {machine()}, shared with other jobs.\n",
             f"Shortened schedule (CPU budget): step 1 = {sd['backbone']} `{sd['preset']}` preset, {sd['epochs']} epochs "
             f"(batch {sd['batch_size']}, lr {sd['lr']}, class_dropout {sd['class_dropout']}) on the 546 TRAIN images "
             f"only; ResNet-18 (MONAI, 28-px stem, random init) {sb['epochs']} epochs, Adam lr {sb['lr']}, batch "
             f"{sb['batch_size']}, best epoch on validation AUC. The paper-scale schedule is far longer; read "
             "these numbers as a pipeline check, not as a reproduction.\n"]
    if syn:
        s = syn["schedule"]["sampling"]
        fid = syn["fidelity"]
        lines += [f"\n### Samples ({syn['synthetic_info']['images']} images, {s['sampler'].upper()}-{s['steps']}, "
                  f"guidance {s['guidance']}, date {syn['date']})\n",
                  f"Sampling time: **{syn['sampling_seconds']:.0f} s for {syn['synthetic_info']['images']} images** "
                  f"at 28 px ({s['sampler'].upper()}-{s['steps']}, batch {s['batch_size']}, "
                  f"{syn['threads']} torch threads, step-1 preset `{sd['preset']}`).\n",
                  f"Per-class fidelity, real = TRAIN images of the class. Feature extractor: **{fid['extractor']}** "
                  f"({fid['extractor_description']}). These are NOT Inception FIDs and must not be compared with "
                  "published FIDs; fewer images than feature dimensions bias FID upwards.\n",
                  f"Pictures: `bench/results/rebalance/runs/real_vs_generated.png` (real next to generated, per class). "
                  f"With this short step-1 schedule ({sd['epochs']} epochs) the samples are still visibly noisy, so the "
                  "table below measures the effect of such samples, not of a converged generator.\n",
                  "| class | real | generated | FID | KID (mean ± std) |", "|---|---|---|---|---|"]
        for name, r in fid["per_class"].items():
            if "fid" in r:
                lines.append(f"| {name} | {r['n_real']} | {r['n_generated']} | {r['fid']:.2f} | "
                             f"{r['kid_mean']:.4f} ± {r['kid_std']:.4f} |")
    if arms:
        minority = syn["minority"] if syn else "malignant"
        lines += ["\n### ResNet-18 on the test split (156 images), mean ± std over seeds\n",
                  f"| training set | seeds | train images (real + synthetic) | macro-F1 | {minority} recall | AUC | "
                  "accuracy | date |", "|---|---|---|---|---|---|---|---|"]
        for arm in ("real", "real+synthetic"):
            rs = sorted([r for r in arms if r["arm"] == arm], key=lambda r: r["seed"])
            if not rs:
                continue
            lines.append(
                f"| {arm} | {len(rs)} ({', '.join(str(r['seed']) for r in rs)}) | "
                f"{rs[0]['n_train_real']} + {rs[0]['n_train_synthetic']} | "
                f"{mean_std([r['test']['f1_macro'] for r in rs])} | "
                f"{mean_std([r['test']['per_class'][minority]['recall'] for r in rs])} | "
                f"{mean_std([r['test']['auc'] for r in rs])} | {mean_std([r['test']['accuracy'] for r in rs])} | "
                f"{rs[-1]['date']} |")
        lines.append("\nAUC uses the score of class 1 ('normal, benign'), the MedMNIST convention.")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine oversubscribed by 2 threads ran 40x slower)")
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)

    def jobs():  # a generator: --table-only never loads the data
        torch.set_num_threads(a.threads)
        data = bundle()
        yield "synthesis", partial(synthesis, data)
        for seed in a.seeds:
            for arm in ("real", "real+synthetic"):
                yield f"{arm.replace('+', '_')}-s{seed}", partial(train_arm, data, arm, seed)

    return run_study(STUDY, jobs(), table, a.table_only)


if __name__ == "__main__":
    sys.exit(main())
