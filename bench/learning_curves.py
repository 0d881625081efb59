"""Learning curves (issue 33): every arm against the number of labelled images, with and without a pool of
unlabelled images. The product's headline figure.

    python -m bench.learning_curves [--datasets ...] [--arms ...] [--points 10 50 250 0] [--seeds ...]   # resumable
    python -m bench.learning_curves --table-only
    DCUBE_BENCH_OUT=$OUT python -m bench.learning_curves --device cuda --budget-s 480 --datasets covid   # a GPU slot

Labelled subsets: `data.labelled_per_class: k` (seeded, stratified, nested: for one seed the k = 10 set lies
inside the k = 50 set); point 0 is the full training split. The pool: the training images left unlabelled
(`data.unlabelled_rest`), plus `cxr_pool_128` where the dataset's name says so; it only ever reaches step 1
(D-Cube) or FixMatch's unlabelled loss, never validation, test or a labelled split.
Seeds: 5 at the two smallest points, 3 elsewhere (SEEDS).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import numpy as np

from bench.baselines import run_baseline
from bench.common import (INDEX, LONG_STEPS, RESULTS, SMOKE, STATS, THREADS, Family, add_budget_arg, load_results,
                          machine, mean_std, run_study, runs_root, shared_data, shrink, smoke_epochs, two_level_test)
from bench.controls import SCHEDULES, data_dict as controls_data

STUDY = "learning_curves"
DATASETS = ("breastmnist", "pneumoniamnist", "pneumoniamnist-cxr", "covid")
POINTS = (10, 50, 250, 0)  # labelled images per class; 0: the whole training split
ARMS = {
    "dcube": "D-Cube, labelled images only",
    "dcube-pool": "D-Cube, the pool in step 1",
    "cnn-only": "CNN-only (the D-Cube head on EfficientNet-Lite0)",
    "resnet18": "ResNet-18",
    "fixmatch": "FixMatch (ResNet-18, the pool unlabelled)",
    "linear-probe": "frozen EfficientNet-Lite0, linear probe",
    "efficientnet-lite0": "EfficientNet-Lite0, fine-tuned",
}
REFERENCE = "dcube-pool"  # the arm the target asks to beat every other
OUT_OF_DOMAIN = "pneumoniamnist-cxr"  # secondary: only the reference arm, at the few-label points, against its
# own pneumoniamnist run of the same point and seed
BASELINE_EPOCHS = {"breastmnist": 30, "pneumoniamnist": 4, "covid": 8}


def base(dataset: str) -> str:
    return dataset.split("-")[0]


def seeds_for(point: int) -> list[int]:
    return [0, 1, 2, 3, 4] if point in POINTS[:2] else [0, 1, 2]


def registered(datasets=DATASETS, points=POINTS, arms=tuple(ARMS), seeds=None) -> list[tuple]:
    """The runs the registration names, as (dataset, point, arm, seed), in the order they run: by point, then
    seed, so that a few-label point is complete before the next starts."""
    return [(ds, point, arm, seed) for point in points for seed in (seeds or seeds_for(point)) for ds in datasets
            for arm in arms if ds != OUT_OF_DOMAIN or (arm == REFERENCE and point in POINTS[:2])]


def data_dict(dataset: str, point: int, arm: str) -> dict:
    d = dict(controls_data(base(dataset)))
    if point:
        d["labelled_per_class"] = point
    if arm in ("dcube-pool", "fixmatch"):
        d["unlabelled_rest"] = True
        if dataset.endswith("-cxr") or base(dataset) == "covid":
            d["unlabelled"] = str(shared_data() / "cxr_pool_128")
    return d


def _cfg(dataset: str, point: int, arm: str, seed: int) -> dict:
    sched = SCHEDULES[base(dataset)]
    cfg = shrink({"run_dir": str(runs_root(STUDY) / f"{dataset}-k{point}-{arm}-s{seed}"), "seed": seed,
                  "threads": THREADS, "data": data_dict(dataset, point, arm),
                  "diffusion": {**sched["diffusion"], "sample_grid": False},
                  "classifier": {**sched["classifier"], "min_steps": LONG_STEPS}})
    cfg["data"] = {**cfg["data"], "split_seed": 0} if SMOKE else cfg["data"]  # smoke caps: one test split
    if arm == "cnn-only":
        cfg["classifier"] = {**cfg["classifier"], "diffusion_features": False}
    return cfg


def _record(dataset, point, arm, seed, data_cfg, out, counts: dict, device: str) -> dict:
    return {"study": STUDY, "dataset": dataset, "point": point, "arm": arm, "seed": seed, "device": device,
            "threads": THREADS, "data_config": data_cfg,
            "train_per_class": float(np.mean(list(counts.values()))), "test": out["test"], "val": out["val"],
            "test_probs": out["test_probs"]}


def dcube_arm(dataset: str, point: int, arm: str, seed: int, device: str = "cpu") -> dict:
    from dcube.config import from_dict
    from dcube.pipeline import run

    from dcube.utils.io import read_json

    cfg = from_dict({**_cfg(dataset, point, arm, seed), "device": device})
    out = run(cfg)
    counts = read_json(f"{cfg.run_dir}/run.json")["data"]["class_counts"]["train"]
    return {**_record(dataset, point, arm, seed, cfg.to_dict()["data"], out, counts, device),
            "stage_seconds": out["timings_s"]}


def baseline_arm(dataset: str, point: int, arm: str, seed: int, device: str = "cpu") -> dict:
    from dcube.config import DataConfig
    from dcube.data import load_data

    run_dir = runs_root(STUDY) / f"{dataset}-k{point}-{arm}-s{seed}"
    dc = _cfg(dataset, point, arm, seed)["data"]
    data = load_data(DataConfig(**dc), seed, run_dir)
    out = run_baseline(arm, data, run_dir, seed, smoke_epochs(BASELINE_EPOCHS[base(dataset)]), THREADS,
                       device=device, min_steps=LONG_STEPS)
    counts = dict(enumerate(np.bincount(data.train.labels.numpy()).tolist()))
    return {**_record(dataset, point, arm, seed, dc, out, counts, device), "method": out["method"],
            "schedule": out["schedule"], "train_seconds": out["train_seconds"]}


def plot(rows: list[dict], dataset: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from dcube.utils.io import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, metric, label in ((axes[0], "f1_macro", "test macro-F1"), (axes[1], "auc", "test AUC")):
        names = {**ARMS, OUT_OF_DOMAIN: f"{ARMS[REFERENCE]} + cxr_pool_128 (secondary)"}
        for i, arm in enumerate(names):
            pts = []
            for point in POINTS:
                rs = [r for r in rows if r["arm"] == arm and r["point"] == point]
                t = two_level_test(rs, None, metric) if len(rs) > 1 else None
                if rs:
                    x = point or float(np.mean([r["train_per_class"] for r in rs]))
                    m = float(np.mean([r["test"][metric] for r in rs]))
                    pts.append((x, m, *(t["ci"] if t else (np.nan, np.nan))))  # one seed: no CI, no band
            if pts:
                x, m, lo, hi = map(np.array, zip(*sorted(pts)))
                x = x * 10 ** (0.012 * (i - (len(names) - 1) / 2))  # arms side by side at one point (log axis)
                lo, hi = np.clip(lo, 0, 1), np.clip(hi, 0, 1)  # a metric in [0, 1]
                ax.plot(x, m, marker="o", color=f"C{i}", label=names[arm], lw=2 if arm == REFERENCE else 1,
                        ls="--" if arm == OUT_OF_DOMAIN else "-")
                ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.12)
                ax.errorbar(x, m, yerr=[m - lo, hi - m], fmt="none", ecolor=f"C{i}", elinewidth=0.8,
                            capsize=2)  # the CI at each point: a band alone is invisible at one
        ax.set_xscale("log")
        ticks = sorted({p for p in POINTS if p} | {round(float(np.mean([r["train_per_class"] for r in rows
                                                                          if r["point"] == 0])))}
                       if any(r["point"] == 0 for r in rows) else {p for p in POINTS if p})
        top = max(p for p in POINTS if p)  # the whole split's tick one line lower when it would overlap k's
        ax.set_xticks(ticks, [("\n" if top < t < 1.5 * top else "") + str(t) for t in ticks])
        ax.set_xlim(min(ticks) / 1.4, max(ticks) * 1.4)  # room for the side-by-side arms at the end points
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("labelled training images per class (the last point: all)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()  # below both panels: inside one it hides points
    legend_rows = -(-len(labels) // 3)
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"{dataset}: learning curves (mean over seeds, 95 % CI: bars and band; arms side by side at each point)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.045 * legend_rows + 0.02, 1, 1))
    path = RESULTS / STUDY / f"learning-{dataset}.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def table() -> str:
    rows = load_results(STUDY)
    lines = ["## Learning curves: labelled images, with and without a pool of unlabelled ones\n",
             f"Command: `python -m bench.learning_curves` (resumable). Machine: {machine()}. Labelled subsets: "
             "`data.labelled_per_class` (seeded, stratified, nested); the pool reaches only D-Cube's step 1 and "
             f"FixMatch's unlabelled loss. Every step 2 / baseline: at least {LONG_STEPS} optimiser steps. "
             f"Paired columns: {ARMS[REFERENCE]} minus the arm, same test images and seeds; {STATS}; each "
             "dataset's comparisons one family. The comparisons, their families and the decision rule were committed "
             "before these runs ([the registration](docs/benchmarks/learning_curves-preregistration.md)).\n"]
    on_gpu = sum(r.get("device") == "cuda" for r in rows)
    if on_gpu:
        lines.append(f"{on_gpu} of these runs trained on a GPU (`--device cuda`; `device` in their JSON), the same "
                     "configurations and seeds as on the CPU.\n")
    want, have = registered(), {(r["dataset"], r["point"], r["arm"], r["seed"]) for r in rows}
    missing = [w for w in want if w not in have]  # in the order they run
    if missing and not SMOKE:  # the registration: an incomplete page says so, and draws no verdict
        lines.append(f"**In progress**: {len(want) - len(missing)} of the {len(want)} registered runs in; no "
                     "verdict of the registered rule is drawn before every run it names is in. Missing, e.g.: "
                     + ", ".join(f"{d} k={p or 'all'} {a} seed {s}" for d, p, a, s in missing[:4]) + ".\n")
    for ds in DATASETS:
        runs = [r for r in rows if r["dataset"] == ds]
        if ds == OUT_OF_DOMAIN:
            lines += _out_of_domain(runs, [r for r in rows if r["dataset"] == base(ds) and r["arm"] == REFERENCE])
            continue
        if not runs:
            continue
        fam = Family(f"{ds}: {ARMS[REFERENCE]} minus every other arm, macro-F1 and AUC")
        lines += [f"\n### {ds}\n", "| labelled / class | arm | seeds | macro-F1 | AUC | ΔF1 [95 % CI], p, Holm p | "
                  "ΔAUC [95 % CI], p, Holm p |", "|---|---|---|---|---|---|---|"]
        for point in POINTS:
            ref = sorted((r for r in runs if r["point"] == point and r["arm"] == REFERENCE), key=lambda r: r["seed"])
            for arm in ARMS:
                rs = sorted((r for r in runs if r["point"] == point and r["arm"] == arm), key=lambda r: r["seed"])
                if not rs:
                    continue
                common = sorted({r["seed"] for r in rs} & {r["seed"] for r in ref})
                cells = ["-", "-"]
                if arm != REFERENCE and len(common) >= 2:
                    pick = lambda xs: [r for r in xs if r["seed"] in common]  # noqa: E731
                    cells = [fam.cell(pick(ref), pick(rs), m) for m in ("f1_macro", "auc")]
                lines.append(f"| {point or 'all'} | {ARMS[arm]} | {len(rs)} | "
                             f"{mean_std([r['test']['f1_macro'] for r in rs])} | "
                             f"{mean_std([r['test']['auc'] for r in rs])} | {cells[0]} | {cells[1]} |")
        path = plot(runs + [{**r, "arm": OUT_OF_DOMAIN} for r in rows if r["dataset"] == OUT_OF_DOMAIN
                            and base(OUT_OF_DOMAIN) == ds], ds)
        lines += ["", fam.note(), "", f"![learning curves, {ds}]({path.relative_to(RESULTS.parent.parent).as_posix()}) "
                  f"{INDEX}" if not SMOKE else f"plot: {path.name}"]
        lines = fam.fill("\n".join(lines)).split("\n")
    return "\n".join(lines)


def _out_of_domain(runs: list[dict], own: list[dict]) -> list[str]:
    """The registration's secondary comparison: the reference arm with cxr_pool_128 added to its pool minus the
    same arm with its own unlabelled rest only, per few-label point; its own family."""
    if not runs:
        return []
    fam = Family(f"{OUT_OF_DOMAIN}: the out-of-domain pool, one comparison per point and metric")
    lines = [f"\n### {OUT_OF_DOMAIN} (secondary, not part of the decision)\n",
             f"{ARMS[REFERENCE]} with `cxr_pool_128` (adult radiographs, resized to 28 px) added to the pool, minus "
             f"the same arm on `{base(OUT_OF_DOMAIN)}` with its own unlabelled rest only; same test images, paired "
             "by seed.\n", "| labelled / class | seeds | macro-F1 | AUC | ΔF1 [95 % CI], p, Holm p | "
             "ΔAUC [95 % CI], p, Holm p |", "|---|---|---|---|---|---|"]
    for point in POINTS[:2]:
        rs = sorted((r for r in runs if r["point"] == point), key=lambda r: r["seed"])
        ref = {r["seed"]: r for r in own if r["point"] == point}
        if not rs:
            continue
        pairs = [r for r in rs if r["seed"] in ref]
        cells = ([fam.cell(pairs, [ref[r["seed"]] for r in pairs], m) for m in ("f1_macro", "auc")]
                 if len(pairs) >= 2 else ["-", "-"])
        lines.append(f"| {point} | {len(rs)} | {mean_std([r['test']['f1_macro'] for r in rs])} | "
                     f"{mean_std([r['test']['auc'] for r in rs])} | {cells[0]} | {cells[1]} |")
    return fam.fill("\n".join(lines + ["", fam.note()])).split("\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--points", nargs="+", type=int, default=list(POINTS))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: SEEDS of each point")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every arm trains (a GPU slot: "
                   "cuda, with DCUBE_BENCH_OUT=$OUT and DCUBE_BENCH_RUNS on the device's disk)")
    add_budget_arg(p)
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)

    def job(ds, point, arm, seed):
        fn = dcube_arm if arm.startswith("dcube") or arm == "cnn-only" else baseline_arm
        return partial(fn, ds, point, arm, seed, a.device)

    jobs = ((f"{ds}-k{point}-{arm}-s{seed}", job(ds, point, arm, seed))
            for ds, point, arm, seed in registered(a.datasets, a.points, a.arms, a.seeds))
    return run_study(STUDY, jobs, table, a.table_only, a.budget_s)


if __name__ == "__main__":
    sys.exit(main())
