"""Robustness (the paper's claim): few labels and a rarer minority class.

    python -m bench.robustness [--datasets breastmnist] [--settings ...] [--methods ...] [--seeds 0 1 2]
    python -m bench.robustness --table-only

Settings: 10% and 25% of the training labels (a stratified subsample drawn by the run's seed, so
every method sees the same images for the same seed), and the minority class cut to 1:10 of the
majority (`data.minority_ratio`). Validation and test splits are untouched. D-Cube (step 1 and
step 2 both see only the reduced training split) vs ResNet-18 vs EfficientNet-Lite0; macro-F1
and minority recall (the smaller training class), mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from bench.accuracy import BASELINE_EPOCHS, SCHEDULES, data_path
from bench.baselines import NAMES, run_baseline
from bench.common import (LONG_STEPS, RESULTS, STATS, THREADS, load_results, machine, mean_std, paired_cell, run_study,
                          shrink, smoke_epochs)

STUDY = "robustness"
TRAIN_SIZES = {"breastmnist": 546, "pneumoniamnist": 4708}
SETTINGS = {"labels10": "10% of the training labels", "labels25": "25% of the training labels",
            "minority1to10": "minority class cut to 1:10"}
METHODS = ("dcube", "dcube-unlabelled", "resnet18", "efficientnet-lite0", "dcube-long", "dcube-unlabelled-long",
           "resnet18-long")
UNLABELLED = "D-Cube + the dropped-label images unlabelled in step 1"
# "-long": step 2 / the baseline trains at least LONG_STEPS optimiser steps (classifier.min_steps: passes
# repeated within each epoch, validation once per epoch as before); the plain
# schedule gives 55 images in batches of 64 one step per epoch, 15 steps in all
LONG = f", >= {LONG_STEPS} training steps"


def data_overrides(dataset: str, setting: str) -> dict:
    if setting.startswith("labels"):
        return {"max_train": round(TRAIN_SIZES[dataset] * int(setting[len("labels"):]) / 100)}
    return {"minority_ratio": 0.1}


def _data_dict(dataset: str, setting: str) -> dict:
    d = shrink({"data": {"name": dataset, "path": data_path(dataset), "download": False}})["data"]
    over = data_overrides(dataset, setting)
    if "max_train" in over and d.get("max_train"):  # smoke: keep the tiny cap
        over["max_train"] = min(over["max_train"], d["max_train"])
    return {**d, **over}


def one_run(dataset: str, setting: str, method: str, seed: int) -> dict:
    from dcube.config import DataConfig, from_dict
    from dcube.data import load_data

    run_dir = RESULTS / STUDY / "runs" / f"{dataset}-{setting}-{method}-s{seed}"
    dd = _data_dict(dataset, setting)
    long = method.endswith("-long")
    base = method.removesuffix("-long")
    if base == "dcube-unlabelled" and not setting.startswith("labels"):
        raise SystemExit(f"bench.robustness: dcube-unlabelled needs a label-fraction setting, not {setting!r}")
    if base in ("dcube", "dcube-unlabelled"):
        from dcube.pipeline import DCube, run

        if base == "dcube-unlabelled":  # the training images whose labels were dropped join step 1
            dd = {**dd, "unlabelled_rest": True}
        c = shrink({"run_dir": str(run_dir), "seed": seed, "threads": THREADS, **SCHEDULES[dataset]})
        if long:
            c["classifier"] = {**c["classifier"], "min_steps": LONG_STEPS}
        cfg = from_dict({**c, "data": dd})  # dd: already shrunk, with this setting's caps
        out = run(cfg)
        data = DCube(cfg).data
        res = {"method": (UNLABELLED if base == "dcube-unlabelled" else "D-Cube") + (LONG if long else ""),
               "method_id": method,
               "test": out["test"], "val": out["val"], "test_probs": out["test_probs"], "layers": out["layers"],
               "config": cfg.to_dict(), "data_config": cfg.to_dict()["data"]}
    else:
        data = load_data(DataConfig(**dd), seed)
        res = run_baseline(base, data, run_dir, seed, smoke_epochs(BASELINE_EPOCHS[dataset][base]), THREADS,
                           min_steps=LONG_STEPS if long else 0)
        res["data_config"] = dd
        if long:
            res.update(method=res["method"] + LONG, method_id=method)
    counts = data.info["class_counts"]["train"]
    return {"study": STUDY, "dataset": dataset, "setting": setting, "seed": seed, "train_counts": counts,
            "minority": min(counts, key=counts.get), **res}


def table() -> str:
    rows = load_results(STUDY)
    lines = ["## Robustness: few labels, rare minority class\n",
             f"Command: `python -m bench.robustness` (resumable). Machine: {machine()}. Schedules as in the accuracy "
             "study (shortened); best epoch on validation AUC; validation and test splits untouched. Minority recall: "
             "test recall of the smallest training class. Rows marked \">= 400 training steps\" set "
             "`classifier.min_steps` (the baseline: the same minimum), so that 55 images in batches of 64 get more than "
             "one optimiser step per epoch. The paired column: seed-mean difference to ResNet-18 (the marked rows: to "
             f"ResNet-18 at the same minimum) on the same test images and seeds ({STATS}; \"-\" for runs "
             "made before per-image probabilities were stored).\n"]
    for ds in TRAIN_SIZES:
        runs = [r for r in rows if r["dataset"] == ds]
        if not runs:
            continue
        lines += [f"\n### {ds}\n", "| setting | training images | model | seeds | macro-F1 | minority recall | AUC | "
                  "minus ResNet-18: Δ macro-F1 [95 % CI], p |", "|---|---|---|---|---|---|---|---|"]
        for setting, label in SETTINGS.items():
            for method in ("D-Cube", UNLABELLED, NAMES["resnet18"], NAMES["efficientnet-lite0"], "D-Cube" + LONG,
                           UNLABELLED + LONG, NAMES["resnet18"] + LONG):
                rs = [r for r in runs if r["setting"] == setting and r["method"] == method]
                if not rs:
                    continue
                # the reference: ResNet-18 trained for as many steps (the same min_steps) as the row
                long = rs[0]["method_id"].endswith("-long")
                ref = [r for r in runs if r["setting"] == setting
                       and r.get("method_id") == ("resnet18-long" if long else "resnet18")]
                seeds = {r["seed"] for r in rs}
                ref = [r for r in ref if r["seed"] in seeds]
                is_ref = rs[0]["method_id"].removesuffix("-long") == "resnet18"
                vs = paired_cell(rs, ref, "f1_macro") if not is_ref and len(ref) == len(rs) else "-"
                counts = ", ".join(f"{c}: {n}" for c, n in rs[0]["train_counts"].items())
                lines.append(f"| {label} | {counts} | {method} | {len(rs)} | "
                             f"{mean_std([r['test']['f1_macro'] for r in rs])} | "
                             f"{mean_std([r['test']['per_class'][r['minority']]['recall'] for r in rs])} | "
                             f"{mean_std([r['test']['auc'] for r in rs])} | {vs} |")
        lines += _unlabelled_lines(runs)
        dc = [r for r in runs if r["method"].startswith("D-Cube")]
        stored = sorted({r["config"]["classifier"]["cycle_weight"] for r in dc if "config" in r})
        if stored:
            lines.append("\nD-Cube runs that stored their configuration (from 2026-12-03) ran classifier.cycle_weight = "
                         + ", ".join(f"{w:g}" for w in stored) + f" ({sum('config' in r for r in dc)} runs); "
                         "the earlier ones ran the defaults of their date (`git log bench/results/robustness`).")
    return "\n".join(lines)


def _unlabelled_lines(runs: list[dict]) -> list[str]:
    """What the unlabelled step-1 images add: D-Cube with them minus D-Cube without, same setting,
    schedule and seeds, paired on the same test images."""
    out = []
    for setting, label in SETTINGS.items():
        for suffix in ("", "-long"):
            pick = {m: [r for r in runs if r["setting"] == setting and r["method_id"] == m + suffix]
                    for m in ("dcube", "dcube-unlabelled")}
            seeds = [{r["seed"] for r in rs} for rs in pick.values()]
            if not all(seeds) or seeds[0] != seeds[1]:
                continue
            dates = sorted({r["date"] for rs in pick.values() for r in rs})
            cell = partial(paired_cell, pick["dcube-unlabelled"], pick["dcube"])
            out.append(f"- {label}{LONG if suffix else ''}: {len(seeds[0])} seeds (runs of {', '.join(dates)}): "
                       f"macro-F1 {cell('f1_macro')}; AUC {cell('auc')}")
    return ["", "D-Cube with the dropped-label images unlabelled in step 1 minus D-Cube without them:", *out] if out else []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["breastmnist", "pneumoniamnist"])
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    jobs = ((f"{ds}-{setting}-{m}-s{seed}", partial(one_run, ds, setting, m, seed))
            for ds in a.datasets for setting in a.settings for seed in a.seeds for m in a.methods
            if not (m.startswith("dcube-unlabelled") and not setting.startswith("labels")))
    return run_study(STUDY, jobs, table, a.table_only)


if __name__ == "__main__":
    sys.exit(main())
