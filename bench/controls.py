"""Does the diffusion model earn its place? Default D-Cube against its control arms, pre-registered in
BENCHMARKS.md ("Control arms") before any of these runs.

    python -m bench.controls [--datasets ...] [--arms ...] [--seeds 0 1 2 3 4]   # resumable
    python -m bench.controls --table-only

Arms (every one trained by dcube's own loops on the same split, schedule and seeds):
  dcube           default D-Cube (step 1 + KS-selected hyper-features + EfficientNet-Lite0 sub-features)
  cnn-only        the same head, losses, schedule, EMA and BN recalibration on EfficientNet-Lite0 alone
                  (classifier.diffusion_features: false): no step 1, no diffusion input
  untrained       D-Cube on the untrained denoiser (diffusion.epochs: 0, the seeded initialisation)
  diffusion-only  D-Cube without the sub-feature CNN (classifier.subfeature: none), on the dcube arm's
                  step-1 model of the same seed when it is kept, else its own (same config and seed)
  resnet18        ResNet-18 from scratch (bench.baselines), the strongest plain CNN of the other studies
  ks-worst        the paper's Table VI: the most Gaussian layers instead of the least (features.ks_keep:
                  most_gaussian), on the dcube arm's step-1 model of the same seed; not pre-registered

MedMNIST rows of dcube and resnet18 at seeds 0-2 are bench.accuracy's stored runs of the same schedule,
split and seed (copied, marked `reused_from`); the pre-registration says so. Run directories live under
$DCUBE_BENCH_RUNS/controls when it is set (checkpoints that outlive a work tree), else results/controls/runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from functools import partial

from bench.baselines import run_baseline
from dcube.evaluate.stats import format_p, result_verdict
from bench.common import (INDEX, RESULTS, SMOKE, THREADS, Family, add_budget_arg, ci_cell, load_results, machine,
                          mean_std, run_study, runs_root, shared_data, shrink, smoke_epochs, thread_hours)

STUDY = "controls"
DATASETS = ("pneumoniamnist", "breastmnist", "covid")
ARMS = {
    "dcube": "D-Cube (default)",
    "cnn-only": "CNN-only: the D-Cube head on EfficientNet-Lite0, no diffusion input",
    "untrained": "D-Cube on the untrained denoiser (seeded initialisation)",
    "diffusion-only": "diffusion-only: D-Cube without the sub-feature CNN",
    "resnet18": "ResNet-18 (from scratch)",
    "ks-worst": "D-Cube on the most Gaussian layers (the paper's Table VI worst case)",
}
OVERRIDES = {"dcube": {}, "cnn-only": {"classifier": {"diffusion_features": False}},
             "untrained": {"diffusion": {"epochs": 0}}, "diffusion-only": {"classifier": {"subfeature": "none"}},
             "ks-worst": {"features": {"ks_keep": "most_gaussian"}}}
SHARES_STEP1 = ("diffusion-only", "ks-worst")  # arms that read the dcube arm's step-1 model of their seed when kept
# the schedules of bench.accuracy (MedMNIST) and bench.covid (D-Cube at 64 px), so that their stored rows of the
# same seed are the same runs
SCHEDULES = {
    "pneumoniamnist": {"diffusion": {"epochs": 4}, "classifier": {"epochs": 4}},
    "breastmnist": {"diffusion": {"epochs": 30}, "classifier": {"epochs": 15}},
    "covid": {"diffusion": {"backbone": "unet", "preset": "tiny", "epochs": 3, "batch_size": 32, "lr": 5e-4,
                            "checkpoint_every": 20},
              "classifier": {"epochs": 4, "batch_size": 64}},
}
RESNET_EPOCHS = {"pneumoniamnist": 4, "breastmnist": 30, "covid": 8}
REUSED = {"pneumoniamnist": (0, 1, 2), "breastmnist": (0, 1, 2)}  # seeds taken from bench.accuracy
PRIMARY = ("dcube", "cnn-only")
SECONDARY = ("untrained", "diffusion-only", "resnet18")
TABLE_VI = ("ks-worst",)  # added after the registration: its own family, not part of the decision


def data_dict(dataset: str) -> dict:
    if dataset == "covid":  # 64 px (step 1 at 128 px does not fit this CPU); near-copies share a split
        return {"source": "folder", "path": str(shared_data() / "covid_radiography_128"), "image_size": 64,
                "val_fraction": 0.1, "test_fraction": 0.2, "split_seed": 0, "duplicates": "near"}
    return {"name": dataset, "path": str(shared_data() / "medmnist" / f"{dataset}.npz"), "download": False}


def _one_test_split(cfg: dict) -> dict:
    """Smoke runs cap the splits, by default per run seed: one cap seed keeps every seed on the same test images."""
    return {**cfg, "data": {**cfg["data"], "split_seed": 0}} if SMOKE else cfg


def _cfg(dataset: str, arm: str, seed: int) -> dict:
    sched = SCHEDULES[dataset]
    cfg = {"run_dir": str(runs_root(STUDY) / f"{dataset}-{arm}-s{seed}"), "seed": seed, "threads": THREADS,
           "data": data_dict(dataset), "diffusion": {**sched["diffusion"], "sample_grid": False},
           "classifier": dict(sched["classifier"])}
    cfg = _one_test_split(shrink(cfg))
    for section, values in OVERRIDES[arm].items():  # after shrink: a smoke run keeps the arm's difference
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def _reused(dataset: str, arm: str, seed: int) -> dict | None:
    """bench.accuracy's stored run of this arm, dataset and seed, when REUSED names it and its schedule matches."""
    if seed not in REUSED.get(dataset, ()) or arm not in ("dcube", "resnet18"):
        return None
    path = RESULTS / "accuracy" / f"{dataset}-{arm}-s{seed}.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    same = (r["schedule"] == SCHEDULES[dataset] if arm == "dcube"
            else r["schedule"].get("epochs") == RESNET_EPOCHS[dataset])
    return {**r, "study": STUDY, "arm": arm, "reused_from": f"accuracy/{path.name}"} if same else None


def dcube_arm(dataset: str, arm: str, seed: int) -> dict:
    from dcube.config import from_dict
    from dcube.pipeline import DCube, run
    from dcube.utils.io import read_json

    if (old := _reused(dataset, arm, seed)) is not None:
        return old
    cfg = from_dict(_cfg(dataset, arm, seed))
    if arm in SHARES_STEP1:  # the dcube arm's step-1 model of this seed, when its run directory kept it
        src = runs_root(STUDY) / f"{dataset}-dcube-s{seed}" / "diffusion"
        dst = runs_root(STUDY) / f"{dataset}-{arm}-s{seed}" / "diffusion"
        if (src / "ema.safetensors").exists() and not (dst / "ema.safetensors").exists():
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("history.json", "ema.safetensors"):  # the model last: it marks step 1 done
                shutil.copyfile(src / f, dst / f)
    out = run(cfg)
    data = DCube(cfg).data
    return {"study": STUDY, "dataset": dataset, "arm": arm, "method": ARMS[arm], "seed": seed,
            "schedule": SCHEDULES[dataset], "config": cfg.to_dict(), "data_config": cfg.to_dict()["data"],
            "data": read_json(cfg.run_dir + "/run.json")["data"], "test": out["test"], "val": out["val"],
            "test_probs": out["test_probs"], "best_epoch": out["best_epoch"], "layers": out["layers"],
            "step1_from": "dcube" if arm in SHARES_STEP1 and (
                runs_root(STUDY) / f"{dataset}-dcube-s{seed}" / "diffusion" / "ema.safetensors").exists() else None,
            "stage_seconds": out["timings_s"], "size": len(data.test)}


def resnet_arm(dataset: str, seed: int) -> dict:
    from dcube.config import DataConfig
    from dcube.data import load_data

    if (old := _reused(dataset, "resnet18", seed)) is not None:
        return old
    run_dir = runs_root(STUDY) / f"{dataset}-resnet18-s{seed}"
    dc = _one_test_split(shrink({"data": data_dict(dataset)}))["data"]
    data = load_data(DataConfig(**dc), seed, run_dir)
    out = run_baseline("resnet18", data, run_dir, seed, smoke_epochs(RESNET_EPOCHS[dataset]), THREADS)
    return {"study": STUDY, "dataset": dataset, "arm": "resnet18", "data": data.info, "data_config": dc, **out}


def _arm(r: dict) -> str:
    return r.get("arm") or ("resnet18" if r.get("method_id") == "resnet18" else "dcube")


def table() -> str:
    rows = load_results(STUDY)
    lines = ["## Control arms: does the diffusion model earn its place?\n",
             f"Command: `python -m bench.controls` (resumable). Machine: {machine()}. The comparisons, data, seeds, "
             "metric and decision rule were committed before these runs ([the registration](docs/benchmarks/controls-preregistration.md)). "
             "Test AUC: seed mean ± std; 95 % CI and every difference: two-level bootstrap (test images, then "
             "seeds), t with Satterthwaite df; \"beats\" / \"below\" only at Holm-adjusted p < 0.05 with at least 3 seeds per arm. Rows marked "
             "\u2020 reuse bench.accuracy's stored run of the same schedule, split and seed.\n", "@@ANSWER@@"]
    primary, secondary = Family("D-Cube minus CNN-only, test AUC, 3 datasets"), Family(
        "D-Cube minus {untrained, diffusion-only, ResNet-18}, test AUC, 3 datasets")
    table_vi = Family("Table VI: least minus most Gaussian layers (the same step-1 model), test AUC, 3 datasets; "
                      "added after the registration")
    primary_ds, vi_ds = [], []  # the dataset of each primary / Table VI comparison, in the family's order
    drawn = []  # (dataset, arm, seeds, family, index of its result) of every comparison, for the plot
    for ds in DATASETS:
        runs = [r for r in rows if r["dataset"] == ds]
        if not runs:
            lines.append(f"\n### {ds}\n\nNo runs yet.")
            continue
        by = {a: sorted((r for r in runs if _arm(r) == a), key=lambda r: r["seed"]) for a in ARMS}
        dc = by["dcube"]
        lines += [f"\n### {ds}\n", "| arm | seeds | test AUC | 95 % CI | val AUC | test macro-F1 | "
                  "D-Cube minus this arm: ΔAUC [95 % CI], p, Holm p | CPU-hours |", "|---|---|---|---|---|---|---|---|"]
        for arm, rs in by.items():
            if not rs:
                continue
            common = sorted({r["seed"] for r in rs} & {r["seed"] for r in dc})
            cell = "-"
            if arm != "dcube" and len(common) >= 2:
                fam = primary if arm in PRIMARY else table_vi if arm in TABLE_VI else secondary
                cell = fam.cell([r for r in dc if r["seed"] in common], [r for r in rs if r["seed"] in common])
                if cell != "-":
                    drawn.append((ds, arm, len(common), fam, len(fam.results) - 1))
                if fam is primary and cell != "-":
                    primary_ds.append((ds, len(common)))
                if fam is table_vi and cell != "-":
                    vi_ds.append((ds, len(common)))
            seeds = ", ".join(f"{r['seed']}{chr(8224) if r.get('reused_from') else ''}" for r in rs)
            lines.append(f"| {ARMS[arm]} | {len(rs)} ({seeds}) | {mean_std([r['test']['auc'] for r in rs])} | "
                         f"{ci_cell(rs)} | {mean_std([r['val']['auc'] for r in rs])} | "
                         f"{mean_std([r['test']['f1_macro'] for r in rs])} | {cell} | "
                         f"{sum(thread_hours(r) for r in rs):.1f} |")
    n_primary = {ds: len({r["seed"] for r in rows if r["dataset"] == ds and _arm(r) in PRIMARY and
                          all(any(q["seed"] == r["seed"] and _arm(q) == a and q["dataset"] == ds for q in rows)
                              for a in PRIMARY)}) for ds in DATASETS}
    done = all(n == 5 for n in n_primary.values())
    lines += ["", "CPU-hours: thread-hours of the arm's runs (seconds times the torch threads a run used), every "
              "stage and session (a shared step-1 model counted once, with its D-Cube run); "
              f"{sum(thread_hours(r) for r in rows):.1f} in all.",
              primary.note(), secondary.note(), table_vi.note(),
              "" if done else "\n**In progress**: the primary comparison has "
              + ", ".join(f"{ds} {n}" for ds, n in n_primary.items())
              + " of 5 paired seeds; no verdict of the pre-registered rule is drawn before all 5 are in."]
    dc_seeds = {ds: {r["seed"] for r in rows if r["dataset"] == ds and _arm(r) == "dcube"} for ds in DATASETS}
    complete = [(ds, a) for ds in DATASETS for a in SECONDARY
                if len(dc_seeds[ds] & {r["seed"] for r in rows if r["dataset"] == ds and _arm(r) == a}) == 5]
    if len(complete) < len(DATASETS) * len(SECONDARY):
        lines.append(f"\n**In progress**: {len(complete)} of the {len(DATASETS) * len(SECONDARY)} secondary "
                     "comparisons are complete (5 paired seeds each); until all are, the secondary family's Holm "
                     "adjustment is over the comparisons shown, and no secondary verdict is final.")
    md = table_vi.fill(secondary.fill(primary.fill("\n".join(lines))))
    if drawn:
        path = plot([(ds, arm, n, fam is primary, fam.results[i]) for ds, arm, n, fam, i in drawn])
        md += ("\n\n" + (f"![D-Cube minus each control arm]({path.relative_to(RESULTS.parent.parent).as_posix()}) {INDEX}"
                          if not SMOKE else f"plot: {path.name}"))
    return md.replace("@@ANSWER@@", _answer(primary, primary_ds, done) + _answer_vi(table_vi, vi_ds))


def plot(entries: list):
    """A forest plot: per dataset, D-Cube minus each arm (test AUC) with its two-level 95 % CI; a hollow
    marker where an arm has fewer than 3 seeds (no verdict), the pre-registered primary arm in blue."""
    from matplotlib.ticker import MaxNLocator

    from dcube.utils.io import atomic_write
    from dcube.utils.plotting import pyplot

    plt = pyplot()
    datasets = [d for d in DATASETS if any(e[0] == d for e in entries)]
    arms = [a for a in ARMS if any(e[1] == a for e in entries)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 0.55 * len(arms) + 1.6),
                             sharey=True, squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for ds_, arm, n, is_primary, r in entries:
            if ds_ != ds:
                continue
            y, color = arms.index(arm), "C0" if is_primary else "C7"
            ax.errorbar(r["diff"], y, xerr=[[r["diff"] - r["ci"][0]], [r["ci"][1] - r["diff"]]], fmt="o",
                        color=color, mfc=color if n >= 3 else "white", capsize=3)
            ax.annotate(f"{n} seeds, {format_p(r['p_holm'], 'Holm p', 2)}", (r["diff"], y), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(ds, fontsize=9)
        ax.set_xlabel("test AUC, D-Cube minus the arm")
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.25, y=0.25)
        ax.xaxis.set_major_locator(MaxNLocator(4))
    axes[0][0].set_yticks(range(len(arms)), [ARMS[a].split(":")[0].split(" (")[0] for a in arms], fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle("Does the diffusion model earn its place? Right of 0: D-Cube higher (two-level bootstrap 95 % CI; "
                 "hollow: fewer than 3 seeds)", fontsize=9)
    fig.tight_layout()
    path = RESULTS / STUDY / "controls.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def _answer(primary, datasets: list, done: bool) -> str:
    """The section's one-line answer (the index of BENCHMARKS.md shows it): the primary family, Holm-adjusted."""
    if not primary.results:
        return "**Answer.** Not yet: no paired runs."
    parts = [f"{ds} {r['diff']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}], {format_p(r['p_holm'], 'Holm p')} ({n} seeds)"
             for (ds, n), r in zip(datasets, primary.results)]
    wins = sum(result_verdict(r, r["p_holm"]) == "beats" for r in primary.results)
    rule = "at least 2 of the 3 datasets with D-Cube minus CNN-only > 0 at Holm p < 0.05"
    if done:
        verdict = f"the pre-registered bar ({rule}) is {'met' if wins >= 2 else 'not met'}."
    elif sum(not (n == 5 and (r["diff"] <= 0 or r["p"] >= 0.05))  # a Holm p is never below its raw p
             for (_, n), r in zip(datasets, primary.results)) + len(DATASETS) - len(datasets) < 2:
        verdict = f"the pre-registered bar ({rule}) cannot be met, whatever the missing seeds show."
    else:
        verdict = "no verdict before all 5 seeds are in."
    return f"**Answer.** Test AUC, D-Cube minus the CNN-only arm: {'; '.join(parts)}; {verdict}"


def _answer_vi(table_vi, datasets: list) -> str:
    """Table VI's line (its own family, added after the registration): the paper's layers minus the worst ones."""
    if not table_vi.results:
        return ""
    parts = [f"{ds} {r['diff']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}], {format_p(r['p_holm'], 'Holm p')} ({n} seeds)"
             for (ds, n), r in zip(datasets, table_vi.results)]
    return " Table VI, the least minus the most Gaussian layers on the same step-1 model: " + "; ".join(parts) + "."


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    add_budget_arg(p)
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)

    def job(ds, arm, seed):
        return partial(resnet_arm, ds, seed) if arm == "resnet18" else partial(dcube_arm, ds, arm, seed)

    jobs = ((f"{ds}-{arm}-s{seed}", job(ds, arm, seed)) for seed in a.seeds for ds in a.datasets for arm in a.arms)
    return run_study(STUDY, jobs, table, a.table_only, a.budget_s)


if __name__ == "__main__":
    sys.exit(main())
