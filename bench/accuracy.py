"""Accuracy study: D-Cube on the official MedMNIST splits, several seeds, next to the MedMNIST v2
published rows.  python -m bench.accuracy [--datasets breastmnist pneumoniamnist] [--seeds 0 1 2]

Schedules are shortened to fit a 2-core CPU machine (see SCHEDULES); they are printed in the table.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from bench.baselines import run_baseline
from bench.common import (RESULTS, STATS, THREADS, add_budget_arg, ci_cell, load_results, machine, mean_std,
                          paired_cell, run_study, shared_data, shrink, smoke_epochs)
from dcube.config import ClassifierConfig

STUDY = "accuracy"
SCHEDULES = {  # per dataset: overrides of the dcube defaults
    "pneumoniamnist": {"diffusion": {"epochs": 4}, "classifier": {"epochs": 4}},
    "breastmnist": {"diffusion": {"epochs": 30}, "classifier": {"epochs": 15}},
}
BASELINE_EPOCHS = {  # MedMNIST v2 trains 100 epochs; shortened for the CPU budget (labelled in the table)
    "pneumoniamnist": {"resnet18": 4, "resnet50": 2, "efficientnet-lite0": 3},
    "breastmnist": {"resnet18": 30, "resnet50": 12, "efficientnet-lite0": 15},
}
METHODS = ("dcube", "dcube-resnet18", "dcube-auto", "dcube-uvit", "linear-probe", "efficientnet-lite0", "resnet18",
           "resnet50")
# D-Cube with MONAI's ResNet-18 (28-px stem, random initialisation) as its sub-feature CNN: an option
# (classifier.subfeature: resnet18), not the default: on BreastMNIST validation it did not beat the default's
# EfficientNet-Lite0 by the step-2 rule (the evidence: docs/benchmarks/step2.md)
OPTION = "D-Cube, ResNet-18 sub-features (classifier.subfeature: resnet18; an option, not the default)"
# classifier.subfeature: auto trains exactly the heads of the two runs above (same seed and configuration
# otherwise; tests/pipeline: byte-identical weights) and keeps the higher validation score, so its row is
# composed from those runs' stored results by the option's own rule (dcube.classify.trainer.choose_subfeature)
AUTO = "D-Cube, sub-feature CNN chosen on validation per run (classifier.subfeature: auto; an option)"
# the paper's step-1 backbone family at the size of the default UNet tiny (about 1.6 M parameters each); the
# paper's own U-ViT (width 512, depth 12) does not train in these schedules on this CPU (bench.size_curve)
UVIT = "D-Cube, U-ViT step 1 (diffusion.backbone: uvit, preset tiny; an option)"
PUBLISHED = {  # MedMNIST v2 paper, test AUC / ACC (../shared/data/README.md)
    "pneumoniamnist": {"ResNet-18 (28)": (0.944, 0.854), "ResNet-50 (28)": (0.948, 0.854),
                       "ResNet-50 (224)": (0.962, 0.884), "auto-sklearn": (0.942, 0.855),
                       "AutoKeras": (0.947, 0.878), "Google AutoML Vision": (0.991, 0.946)},
    "breastmnist": {"ResNet-18 (28)": (0.901, 0.863), "ResNet-50 (28)": (0.857, 0.812),
                    "ResNet-50 (224)": (0.866, 0.842), "auto-sklearn": (0.836, 0.803),
                    "AutoKeras": (0.871, 0.831), "Google AutoML Vision": (0.919, 0.861)},
}


def data_path(name: str) -> str:
    return str(shared_data() / "medmnist" / f"{name}.npz")


def dcube_run(dataset: str, seed: int, subfeature: str | None = None, backbone: str | None = None) -> dict:
    from dcube.config import from_dict
    from dcube.pipeline import run
    from dcube.utils.io import read_json

    sched = SCHEDULES[dataset]
    name = "dcube" + "".join(f"-{v}" for v in (subfeature, backbone) if v)
    sections = {**sched, "classifier": {**sched["classifier"], "subfeature": subfeature}} if subfeature else sched
    if backbone:
        sections = {**sections, "diffusion": {**sections["diffusion"], "backbone": backbone, "preset": "tiny"}}
    cfg = from_dict(shrink({
        "run_dir": str(RESULTS / STUDY / "runs" / f"{dataset}-{name}-s{seed}"), "seed": seed, "threads": THREADS,
        "data": {"name": dataset, "path": data_path(dataset), "download": False},
        **sections,
    }))
    out = run(cfg)
    return {"study": STUDY, "dataset": dataset, "method": OPTION if subfeature else UVIT if backbone else "D-Cube",
            "method_id": name, "seed": seed, "schedule": sched,
            "config": cfg.to_dict(), "data": read_json(Path(cfg.run_dir) / "run.json")["data"],
            "data_config": cfg.to_dict()["data"],
            "test": out["test"], "val": out["val"], "test_probs": out["test_probs"], "best_epoch": out["best_epoch"],
            "layers": out["layers"],
            "stage_seconds": out["timings_s"]}


def auto_run(dataset: str, seed: int) -> dict:
    """The subfeature=auto row of one seed, from the stored runs of its two candidates (AUTO)."""
    from dcube.classify.trainer import AUTO_CANDIDATES, choose_subfeature
    from dcube.utils.io import read_json

    keys = {"efficientnet-lite0": f"{dataset}-dcube-s{seed}", "resnet18": f"{dataset}-dcube-resnet18-s{seed}"}
    assert set(keys) == set(AUTO_CANDIDATES), AUTO_CANDIDATES
    missing = [k for k in keys.values() if not (RESULTS / STUDY / f"{k}.json").exists()]
    if missing:
        raise SystemExit(f"bench.accuracy dcube-auto: run {', '.join(missing)} first (--methods dcube dcube-resnet18)")
    cand = {n: read_json(RESULTS / STUDY / f"{k}.json") for n, k in keys.items()}
    chosen = choose_subfeature({n: r["best_epoch"] for n, r in cand.items()})
    return {**cand[chosen], "method": AUTO, "method_id": "dcube-auto", "chosen": chosen,
            "composed_from": [keys[n] for n in AUTO_CANDIDATES],
            "candidates": {n: r["best_epoch"] for n, r in cand.items()}, "wall_s_candidates": sum(
                r["wall_s"] for r in cand.values())}


def baseline_run(dataset: str, method: str, seed: int) -> dict:
    from dcube.config import DataConfig
    from dcube.data import load_data

    dc = shrink({"data": {"name": dataset, "path": data_path(dataset), "download": False}})["data"]
    data = load_data(DataConfig(**dc), seed)
    out = run_baseline(method, data, RESULTS / STUDY / "runs" / f"{dataset}-{method}-s{seed}", seed,
                       smoke_epochs(BASELINE_EPOCHS[dataset].get(method)), THREADS)
    return {"study": STUDY, "dataset": dataset, "data": data.info, "data_config": dc, **out}


def _schedule(r: dict) -> str:
    s = r["schedule"]
    if r["method"].startswith("D-Cube"):
        return "; ".join(f"{k}.epochs={v.get('epochs')}" for k, v in s.items()) + " (shortened)"
    if "epochs" in s:
        return f"{s['epochs']} epochs, Adam {s['lr']:g}, batch {s['batch_size']}, LR x0.1 at 50/75% (MedMNIST: 100)"
    return "C on validation from " + ", ".join(str(c) for c in s["C_grid"])


def _cycle_note(dcube_runs: list[dict]) -> str:
    """Which cycle-loss weight the D-Cube rows ran, read from their stored configs."""
    weights = sorted({r["config"]["classifier"]["cycle_weight"] for r in dcube_runs if "config" in r})
    if not weights:
        return ""
    return (f" The D-Cube rows ran classifier.cycle_weight = {', '.join(f'{w:g}' for w in weights)}"
            f" (the default today: {ClassifierConfig().cycle_weight:g}).")


def table() -> str:
    rows = load_results(STUDY)
    lines = ["## Accuracy on MedMNIST (28 px, official splits)\n",
             "Command: `python -m bench.accuracy` (resumable; `--datasets`, `--methods`, `--seeds`). "
             f"Machine: {machine()}. Every dcube row: best epoch / C chosen on validation AUC, the same "
             "official split, 3 seeds unless fewer are listed; AUC is the MedMNIST convention (positive-class "
             "score for binary tasks).\n"]
    for ds in PUBLISHED:
        runs = [r for r in rows if r["dataset"] == ds]
        lines += [f"\n### {ds}\n", "| model | seeds | test ACC | test AUC | test AUC 95 % CI | D-Cube minus this row: "
                  "ΔAUC [95 % CI], p | ΔACC [95 % CI], p | macro-F1 | schedule | date |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        order = ["D-Cube"] + [r["method"] for r in runs if r["method"] != "D-Cube"]
        dc = [r for r in runs if r["method"] == "D-Cube"]
        for method in dict.fromkeys(order):
            rs = [r for r in runs if r["method"] == method]
            if not rs:
                continue
            vs = (["-", "-"] if method == "D-Cube" or not dc  # no D-Cube rows (yet) to pair with
                  else [paired_cell(dc, rs, "auc"), paired_cell(dc, rs, "accuracy")])
            lines.append(f"| **{method}** (dcube) | {len(rs)} ({', '.join(str(r['seed']) for r in rs)}) | "
                         f"{mean_std([r['test']['accuracy'] for r in rs])} | {mean_std([r['test']['auc'] for r in rs])} | "
                         f"{ci_cell(rs)} | {vs[0]} | {vs[1]} | "
                         f"{mean_std([r['test']['f1_macro'] for r in rs])} | {_schedule(rs[0])} | {rs[-1]['date']} |")
        for name, (auc, acc) in PUBLISHED[ds].items():
            lines.append(f"| {name} (published, MedMNIST v2) | - | {acc:.3f} | {auc:.3f} | - | - | - | - | paper | - |")
        lines.append("\nCIs and paired tests need the per-image test probabilities, which runs made before "
                     "2026-12-01 did not store (\"-\"); CIs and the paired seed-mean differences on the same test images: "
                     f"{STATS}. The D-Cube rows dated before "
                     "2026-12-01 ran dcube 0.1's defaults (pooled KS, softmax scores, fuse 8, cycle x0.1)."
                     + _cycle_note(dc))
        dc = [r for r in runs if r["method"] == "D-Cube"]
        if dc:
            lines += ["", gap_line(ds, dc)]
        lines += _option_lines(runs)
    return "\n".join(lines)


def _option_lines(runs: list[dict]) -> list[str]:
    """Each option's rows minus each baseline's (the table's paired column compares the default D-Cube)."""
    by = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    out = []
    for label, opt in ((OPTION, "D-Cube with ResNet-18 sub-features"), (AUTO, "D-Cube with the sub-feature CNN "
                                                                              "chosen on validation"),
                       (UVIT, "D-Cube with a U-ViT step 1")):
        if by.get(label):
            out += ["", *(f"- {opt} minus {m}: ΔAUC {paired_cell(by[label], rs, 'auc')}; "
                          f"ΔACC {paired_cell(by[label], rs, 'accuracy')}"
                          for m, rs in by.items() if not m.startswith("D-Cube"))]
    if by.get(AUTO):
        picks = ", ".join(f"seed {r['seed']}: {r['chosen']} (validation AUC "
                          + " vs ".join(f"{b['score']:.4f}" for b in r["candidates"].values()) + ")"
                          for r in sorted(by[AUTO], key=lambda r: r["seed"]))
        out += [f"- The choice per seed ({' vs '.join(by[AUTO][0]['candidates'])}): {picks}. The row is composed "
                "from the candidates' runs (`dcube-auto`: the option trains exactly those heads and keeps the higher "
                "validation score; a tie keeps the first); it costs both runs' step 2.",
                gap_line_for("D-Cube with the sub-feature CNN chosen on validation", by[AUTO])]
    return out


def gap_line_for(label: str, rs: list[dict]) -> str:
    """A D-Cube variant's mean test ACC / AUC minus the published ResNet-18 (28 px) row."""
    auc, acc = PUBLISHED[rs[0]["dataset"]]["ResNet-18 (28)"]
    m = {k: sum(r["test"][k] for r in rs) / len(rs) for k in ("accuracy", "auc")}
    return (f"- {label} minus the published ResNet-18 (28 px): ACC {m['accuracy']:.4f} - {acc:.3f} = "
            f"{m['accuracy'] - acc:+.4f}; AUC {m['auc']:.4f} - {auc:.3f} = {m['auc'] - auc:+.4f}.")


def gap_line(dataset: str, dcube_runs: list[dict]) -> str:
    """D-Cube's mean test ACC / AUC minus the best published row's, per metric."""
    parts = []
    for i, metric, label in ((1, "accuracy", "ACC"), (0, "auc", "AUC")):
        name, best = max(((n, v[i]) for n, v in PUBLISHED[dataset].items()), key=lambda nv: nv[1])
        mean = sum(r["test"][metric] for r in dcube_runs) / len(dcube_runs)
        parts.append(f"{label} {mean - best:+.3f} against {name} ({best:.3f})")
    n = len(dcube_runs)
    return f"D-Cube (mean of {n} seed{'s' * (n > 1)}) minus the best published row: " + "; ".join(parts) + "."


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--datasets", nargs="+", default=["breastmnist", "pneumoniamnist"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    add_budget_arg(p)
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    def job(ds, m, seed):  # "dcube", "dcube-<subfeature>" or "dcube-auto"
        if m == "dcube-auto":
            return partial(auto_run, ds, seed)
        if m == "dcube-uvit":
            return partial(dcube_run, ds, seed, backbone="uvit")
        if m.startswith("dcube"):
            return partial(dcube_run, ds, seed, m.partition("-")[2] or None)
        return partial(baseline_run, ds, m, seed)

    jobs = ((f"{ds}-{m}-s{seed}", job(ds, m, seed)) for ds in a.datasets for m in a.methods for seed in a.seeds)
    return run_study(STUDY, jobs, table, a.table_only, a.budget_s)


if __name__ == "__main__":
    sys.exit(main())
