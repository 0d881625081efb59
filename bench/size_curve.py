"""Step-1 model size at equal CPU time: which backbone and preset give the best diffusion features on this
machine? (issue 32, item 4)

    python -m bench.size_curve [--datasets breastmnist covid] [--models unet-tiny uvit-small ...] [--seeds 0 1 2]
    python -m bench.size_curve --table-only

Every run trains step 1 for the same CPU budget (BUDGET_MINUTES of CPU time, summed over the run's torch threads):
the model's CPU seconds per optimiser step are timed first (a few steps after a warm-up, at the run's threads), and
the run gets as many steps as fit. Within a dataset every run uses the same number of threads (the table shows it). Every
fifth of the run the EMA model's pooled block features get the validation probe of bench.convergence (fitted
on training images, block and C chosen on validation); the best checkpoint on validation is the chosen one,
and only its probe is scored on test. The decision (preset and backbone of step 1) is taken on validation only.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import numpy as np

from bench.common import (RESULTS, SMOKE, THREADS, add_budget_arg, load_results, machine, mean_std, run_study, runs_root,
                          shrink)
from bench.controls import data_dict  # the same splits as the control arms
from bench.convergence import probe_run

STUDY = "size_curve"
MODELS = ("unet-micro", "unet-tiny", "unet-small", "uvit-tiny", "uvit-small")
DEFAULT = "unet-tiny"  # today's step-1 default
BUDGET_MINUTES = {"breastmnist": 10, "covid": 20}  # step-1 training CPU-minutes per run (thread-minutes)
EVALS = 5  # validation probes per run
TIMED_STEPS = 3  # training steps timed (after one warm-up) to set a run's number of steps
SEEDS = (0, 1, 2)
# the default changes only when another model's seed-mean validation probe AUC is higher than the default's on
# BOTH datasets by at least this much (fixed before any run: the seed spread of the probe in bench.convergence)
MARGIN = 0.01
RULE = (f"another model replaces `{DEFAULT}` only when its seed-mean validation probe AUC is at least {MARGIN} "
        "higher on every dataset")


def seconds_per_step(backbone: str, preset: str, channels: int, size: int, batch: int, steps: int = 3) -> float:
    """Median CPU seconds of this process for one training step (forward, backward, AdamW) on random data, after
    a warm-up: CPU time, not wall time, so that other jobs on the machine do not change a model's budget."""
    import torch

    from dcube.config import DiffusionConfig
    from dcube.diffusion import build_denoiser

    torch.set_num_threads(THREADS)
    model = build_denoiser(DiffusionConfig(backbone=backbone, preset=preset), channels, size, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t = torch.randn(batch, channels, size, size), torch.randint(0, 1000, (batch,))
    cond = torch.nn.functional.one_hot(torch.randint(0, 2, (batch,)), 2).float()
    times = []
    for i in range(steps + 1):
        t0 = time.process_time()
        opt.zero_grad()
        model(x, t, cond).square().mean().backward()
        opt.step()
        if i:
            times.append(time.process_time() - t0)
    return float(np.median(times))


def size_run(dataset: str, model: str, seed: int) -> dict:
    from dcube.config import DiffusionConfig
    from dcube.diffusion import build_denoiser

    backbone, preset = model.split("-")
    data = data_dict(dataset)
    size = data.get("image_size", 28)
    sec = seconds_per_step(backbone, preset, 1, size, 4 if SMOKE else 64, 1 if SMOKE else TIMED_STEPS)
    steps = 2 if SMOKE else max(EVALS, int(BUDGET_MINUTES[dataset] * 60 / sec))
    cfg = shrink({"run_dir": str(runs_root(STUDY) / f"{dataset}-{model}-s{seed}"), "seed": seed, "threads": THREADS,
                  "data": data, "diffusion": {"backbone": backbone, "preset": preset, "sample_grid": False}})
    cfg["diffusion"] = {**cfg["diffusion"], "backbone": backbone, "preset": preset, "epochs": "auto",
                        "max_steps": steps, "patience": 10_000, "checkpoint_every": max(1, steps // EVALS)}
    params = sum(p.numel() for p in build_denoiser(DiffusionConfig(backbone=backbone, preset=preset), 1, size,
                                                   2).parameters())
    return {"study": STUDY, "dataset": dataset, "model": model, "seed": seed, "params": params, "threads": THREADS,
            "seconds_per_step": sec, "steps": steps, "budget_minutes": BUDGET_MINUTES[dataset],
            **probe_run(cfg)}


def plot(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcube.utils.io import atomic_write

    runs = _runs(rows)
    datasets = [d for d in BUDGET_MINUTES if any(r["dataset"] == d for r in rows)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for i, backbone in enumerate(("unet", "uvit")):
            pts = []
            for (d, m), rs in runs.items():
                if d == ds and m.startswith(backbone):
                    v = [r["val_auc"] for r in rs]
                    pts.append((rs[0]["params"], np.mean(v), np.std(v), m.split("-")[1]))
            if not pts:
                continue
            x, y, e, names = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=f"C{i}", label=backbone)
            for xi, yi, n in zip(x, y, names):
                ax.annotate(n, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.margins(y=0.12)  # room for the preset names above the top point
        ax.set_xlabel("parameters")
        ax.set_ylabel("validation probe AUC (chosen checkpoint)")
        ax.set_title(f"{ds}: {BUDGET_MINUTES[ds]} CPU-minutes of step 1 per model", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Step-1 model size at equal CPU time (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    path = RESULTS / STUDY / "size_curve.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def _runs(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The runs of each (dataset, model) that has any, in BUDGET_MINUTES then MODELS order."""
    return {(ds, m): rs for ds in BUDGET_MINUTES for m in MODELS
            if (rs := [r for r in rows if r["dataset"] == ds and r["model"] == m])}


def _decision(rows: list[dict]) -> list[str]:
    """The rule, applied when every registered run (each dataset, model and seed of SEEDS) is in, or earlier
    when one complete dataset already rules every other model out."""
    have = {(r["dataset"], r["model"], r["seed"]) for r in rows}
    want = [(ds, m, s) for ds in BUDGET_MINUTES for m in MODELS for s in SEEDS]
    count = f"{sum(w in have for w in want)} of the {len(want)} runs are in"
    means = {key: np.mean([r["val_auc"] for r in rs]) for key, rs in _runs(rows).items()}
    if not SMOKE and any(w not in have for w in want):
        # a model needs the margin on EVERY dataset: one complete dataset where none has it decides already
        for ds in (d for d in BUDGET_MINUTES if all((d, m, s) in have for m in MODELS for s in SEEDS)):
            top = max(means[(ds, m)] - means[(ds, DEFAULT)] for m in MODELS if m != DEFAULT)
            if top < MARGIN:
                return ["", f"**Answer.** Decision on validation (rule fixed before the runs: {RULE}): on {ds}, with "
                            f"every model and seed in, no model is {MARGIN} above `{DEFAULT}` (the largest gain: "
                            f"{top:+.3f}), so the remaining runs complete the curve but cannot change the choice; "
                            f"step-1 default: **{DEFAULT}**. **In progress**: {count}."]
        return ["", f"**In progress**: decision not yet ({count}). The rule, "
                    f"applied when every dataset, model and seed is in: {RULE}."]
    both = [m for m in MODELS if all((ds, m) in means for ds in BUDGET_MINUTES)]
    if DEFAULT not in both or len(both) < 2:
        return ["", "**In progress**: decision not yet (every dataset needs the default and another model)."]
    per = {m: [means[(ds, m)] - means[(ds, DEFAULT)] for ds in BUDGET_MINUTES] for m in both if m != DEFAULT}
    best = max(per, key=lambda m: min(per[m]))
    chosen = best if min(per[best]) >= MARGIN else DEFAULT
    listed = "; ".join(f"`{m}` " + ", ".join(f"{g:+.3f}" for g in per[m]) for m in per)
    verdict = (f"`{best}` is at least {MARGIN} above on every dataset" if chosen == best
               else f"No model is {MARGIN} above on every dataset")
    return ["", f"**Answer.** Decision on validation (rule fixed before the runs: {RULE}). Each model's seed-mean "
                f"validation probe AUC minus `{DEFAULT}`'s ({', '.join(BUDGET_MINUTES)}): {listed}. "
                f"{verdict}; step-1 default: **{chosen}**."]


def _step_spread(rows: list[dict]) -> tuple[float, str, str] | None:
    """The largest ratio of most to fewest steps among one model's seeds on one dataset, with that dataset and model."""
    spread = [(max(st) / min(st), ds, m) for (ds, m), rs in _runs(rows).items()
              if len(st := [r["steps"] for r in rs]) > 1]
    return max(spread) if spread else None


def table() -> str:
    rows = load_results(STUDY)
    lines = ["## Step-1 model size at equal CPU time\n",
             f"Command: `python -m bench.size_curve` (resumable). Machine: {machine()}. Each run: step 1 for the same "
             "CPU budget (steps = budget / the CPU seconds one step took when timed, batch 64, summed over the run's torch "
             "threads: the threads column), the validation probe "
             f"{EVALS} times, the best checkpoint on validation chosen, its probe scored once on test.\n",
             "| dataset | model | parameters | seeds | threads | steps | CPU s / step | val probe AUC (chosen) | "
             "test probe AUC | training wall-minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (ds, m), rs in _runs(rows).items():
        # runs made before records stored their threads ran on one
        threads = ", ".join(str(t) for t in sorted({r.get("threads", 1) for r in rs}))
        lines.append(f"| {ds} | {m} | {rs[0]['params'] / 1e6:.2f} M | {len(rs)} | {threads} | "
                     f"{mean_std([float(r['steps']) for r in rs], 0)} | "
                     f"{mean_std([r['seconds_per_step'] for r in rs], 2)} | "
                     f"{mean_std([r['val_auc'] for r in rs])} | {mean_std([r['test_auc'] for r in rs])} | "
                     f"{mean_std([r['train_minutes'] for r in rs], 1)} |")
    if rows:
        if spread := _step_spread(rows):
            ratio, ds, m = spread
            lines += ["", f"Each run times its own steps (the median of {TIMED_STEPS} steps' process CPU time, which "
                          "counts every thread of the process), so one model's budget in steps differs between seeds: "
                          f"by up to {ratio:.2f}x ({ds}, {m}). The steps column shows it."]
        lines += _decision(rows)
        path = plot(rows)
        lines += ["", f"![step-1 size curve]({path.relative_to(RESULTS.parent.parent).as_posix()})"
                  if not SMOKE else f"plot: {path.name}"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=list(BUDGET_MINUTES), default=list(BUDGET_MINUTES))
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    add_budget_arg(p)
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    jobs = ((f"{ds}-{m}-s{seed}", partial(size_run, ds, m, seed))
            for seed in a.seeds for ds in a.datasets for m in a.models)
    return run_study(STUDY, jobs, table, a.table_only, a.budget_s)


if __name__ == "__main__":
    sys.exit(main())
