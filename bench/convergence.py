"""Step-1 convergence per CPU-hour (issue 11): which step-1 loss reaches a given validation score first.

    python -m bench.convergence [--datasets breastmnist] [--seeds 0 1 2] [--variants ...] [--epochs N]   # resumable
    python -m bench.convergence --table-only
    python -m bench.convergence --datasets pneumoniamnist --epochs 100 --variants normalized --grids   # samples

BreastMNIST (or PneumoniaMNIST: `--datasets pneumoniamnist`), 28 px, the `unet` tiny preset. Each variant trains step 1 with ``diffusion.epochs: auto``
machinery at a fixed length (patience larger than the run, so the whole curve is drawn): every
``checkpoint_every`` steps the EMA model's pooled block features get a logistic-regression probe fitted on
training images and scored on VALIDATION (best block and C on validation); the best-scoring checkpoint
is the chosen one. Only then is the test split read once: the same probe (block, C of the chosen
checkpoint) scored on test. Same seed and data for every variant; the plot draws validation AUC against
step and against training CPU-minutes.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from itertools import product

import numpy as np

from bench.accuracy import data_path
from bench.common import RESULTS, SMOKE, THREADS, load_results, machine, mean_std, run_study, shrink

NAMES = {"breastmnist": "BreastMNIST", "pneumoniamnist": "PneumoniaMNIST"}

STUDY = "convergence"
TRAIN_SIZES = {"breastmnist": 546, "pneumoniamnist": 4708}
EVAL_EPOCHS = {"breastmnist": 5, "pneumoniamnist": 1}  # the probe every this many epochs (~45 / 74 steps)
STANDARD_EPOCHS = {"breastmnist": 30, "pneumoniamnist": 10}  # the schedule of each dataset's main table
VARIANTS = {  # key -> (label, diffusion overrides)
    "normalized": ("contrastive, normalized form (dcube 0.1 default)", {}),
    "paper": ("contrastive, the paper's Eq. 4 (raw features, margin 0.1, weight 1, pairs in the batch)",
              {"contrastive_form": "paper", "contrastive_weight": 1.0}),
    "min_snr": ("normalized contrastive + min-SNR-5 weighting", {"loss_weighting": "min_snr"}),
    "no_contrastive": ("noise MSE only", {"contrastive_weight": 0.0}),
    "untrained": ("untrained denoiser (step 0, the same seeded initialisation): the reference", {}),
}
ARCHIVED = {"min_snr"}  # removed in dcube 1.0 (CHANGELOG.md): stored rows stay in the table, no new runs


def eval_epochs(dataset: str, epochs: int) -> int:
    """Epochs between probes: the dataset's usual spacing, stretched so a long schedule draws ~20 points."""
    return max(EVAL_EPOCHS[dataset], round(epochs / 20))


def run_name(dataset: str, key: str, seed: int, epochs: int) -> str:
    """A run's name (and its JSON's): a schedule other than the dataset's standard one carries its length."""
    if key == "untrained" or epochs == STANDARD_EPOCHS[dataset] or SMOKE:
        return f"{dataset}-{key}-s{seed}"
    return f"{dataset}-e{epochs}-{key}-s{seed}"


def _cfg(dataset: str, key: str, seed: int, epochs: int) -> dict:
    steps_per_epoch = -(-TRAIN_SIZES[dataset] // 64)
    cfg = shrink({"run_dir": str(RESULTS / STUDY / "runs" / run_name(dataset, key, seed, epochs)), "seed": seed,
                  "threads": THREADS, "data": {"name": dataset, "path": data_path(dataset), "download": False},
                  "diffusion": {"sample_grid": False, **VARIANTS[key][1]}})
    cap = min(epochs * steps_per_epoch, cfg["diffusion"].get("max_steps") or epochs * steps_per_epoch)  # smoke: shrink's
    auto = {"epochs": "auto", "max_steps": cap, "patience": 10_000,
            "checkpoint_every": 1 if SMOKE else eval_epochs(dataset, epochs) * steps_per_epoch}
    cfg["diffusion"] = {**cfg["diffusion"], **auto}
    return cfg


def untrained_run(dataset: str, seed: int) -> dict:
    """The probe on the seeded initial weights: what step 1 has to beat for its training to count."""
    from dcube.config import from_dict
    from dcube.diffusion import build_denoiser
    from dcube.features import extract
    from dcube.features.probe import validation_probe
    from dcube.pipeline import DCube
    from dcube.utils.runtime import seed_everything

    cfg = from_dict(_cfg(dataset, "untrained", seed, 1))
    r = DCube(cfg)
    d = r.data
    seed_everything(seed)  # as the trainer does before it builds the model
    model = build_denoiser(cfg.diffusion, d.train.images.shape[1], cfg.data.image_size, len(d.class_names)).eval()
    val_auc, info = r._step1_probe()(model)
    fc, sched = cfg.features, r._scheduler(cfg.diffusion)
    tr = extract(model, d.train.images, [info["layer"]], fc, seed, sched, desc="train")
    te = extract(model, d.test.images, [info["layer"]], fc, seed, sched, desc="test")  # read once, after the choice
    test_auc, _ = validation_probe(tr, d.train.labels, te, d.test.labels, Cs=(info["C"],))
    return {"study": STUDY, "dataset": dataset, "variant": "untrained", "label": VARIANTS["untrained"][0],
            "seed": seed, "epochs": 0, "curve": [{"step": 0, "score": val_auc, "train_seconds": 0.0, **info}],
            "chosen_step": 0, "val_auc": val_auc, "test_auc": test_auc, "chosen_layer": info["layer"],
            "train_minutes": 0.0}


def variant_run(dataset: str, key: str, seed: int, epochs: int) -> dict:
    return {"study": STUDY, "dataset": dataset, "variant": key, "label": VARIANTS[key][0], "seed": seed,
            "epochs": epochs, **probe_run(_cfg(dataset, key, seed, epochs))}


def probe_run(cfg_dict: dict) -> dict:
    """Step 1 of `cfg_dict` (diffusion.epochs auto: the validation probe at every checkpoint), then the chosen
    checkpoint's probe (its block and C) scored once on test. -> curve, chosen step, val / test AUC, minutes."""
    from dcube.config import from_dict
    from dcube.features import extract
    from dcube.features.probe import validation_probe
    from dcube.pipeline import DCube
    from dcube.utils.io import read_json

    cfg = from_dict(cfg_dict)
    seed = cfg.seed
    r = DCube(cfg)
    r.train_diffusion()
    hist = read_json(r.dir / "diffusion" / "history.json")
    model, dcfg = r.denoiser()  # the chosen (best-on-validation) checkpoint
    chosen = next(p for p in hist["probe"] if p["step"] == hist["chosen_step"])
    d, fc, sched = r.data, r.cfg.features, r._scheduler(dcfg)
    layer = [chosen["layer"]]
    tr = extract(model, d.train.images, layer, fc, seed, sched, desc="train")
    te = extract(model, d.test.images, layer, fc, seed, sched, desc="test")  # read once, after the choice
    test_auc, _ = validation_probe(tr, d.train.labels, te, d.test.labels, Cs=(chosen["C"],))
    return {"curve": hist["probe"], "chosen_step": hist["chosen_step"], "val_auc": hist["chosen_score"],
            "test_auc": test_auc, "chosen_layer": chosen["layer"],
            "train_minutes": hist["probe"][-1]["train_seconds"] / 60}


GRID = {"per_class": 2 if SMOKE else 8, "seed": 1, "samplers": (("ddpm", None), ("ddim", 50))}  # --grids


def grid_path(name: str):
    return RESULTS / STUDY / f"samples-{name}.png"


def draw_grid(dataset: str, key: str, seed: int, epochs: int):
    """Samples of a finished run's chosen (best-on-validation) checkpoint, DDPM over every step and DDIM-50 from
    the same starting noise, under the first training images of each class; -> the PNG, or None when the run
    has not finished (its JSON is missing). Reads the run's weights; writes nothing into the run."""
    import torch

    from dcube.config import from_dict
    from dcube.data import load_data
    from dcube.diffusion.sampling import sample_images
    from dcube.diffusion.trainer import load_denoiser
    from dcube.generate.grid import save_rows

    name = run_name(dataset, key, seed, epochs)
    if key == "untrained" or not (RESULTS / STUDY / f"{name}.json").exists():
        return None
    cfg = from_dict(_cfg(dataset, key, seed, epochs))
    model, dcfg = load_denoiser(f"{cfg.run_dir}/diffusion/ema.safetensors")
    data = load_data(cfg.data, seed)
    per = GRID["per_class"]
    labels = torch.arange(data.num_classes).repeat_interleave(per)
    sets = [("real (training)", data.train.images, data.train.labels)]
    for sampler, steps in GRID["samplers"]:
        imgs = sample_images(model, dcfg, labels, sampler=sampler, steps=steps, seed=GRID["seed"], desc=sampler)
        sets.append((f"{sampler.upper()}-{steps or dcfg.num_train_timesteps}", imgs, labels))
    return save_rows(sets, data.class_names, grid_path(name), per)


def _grid_lines(dataset: str, rows: list[dict]) -> list[str]:
    """The grid of the lowest seed's default-variant run, when drawn (`--grids`)."""
    mine = sorted((r for r in rows if r["variant"] == DEFAULT), key=lambda r: r["seed"])
    if not mine or not grid_path(name := run_name(dataset, DEFAULT, mine[0]["seed"], mine[0]["epochs"])).exists():
        return []
    r, path = mine[0], grid_path(name)
    return ["", f"Samples of seed {r['seed']}'s chosen checkpoint (step {r['chosen_step']}, chosen by the validation "
                f"probe, not by FID): per class, {GRID['per_class']} training images, then "
                f"{' and '.join(f'{m.upper()}-{n}' if n else f'{m.upper()} over all steps' for m, n in GRID['samplers'])} "
                f"from the same starting noise (seed {GRID['seed']}; `--grids`):",
            "", f"![samples, {name}]({path.relative_to(RESULTS.parent.parent).as_posix()})"
            if not SMOKE else f"grid: {path.name}"]


def plot(rows: list[dict], dataset: str, epochs: int | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcube.utils.io import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for i, key in enumerate(VARIANTS):
        rs = [r for r in rows if r["variant"] == key]
        if key == "untrained" and rs:  # a level, not a curve
            for ax in axes:
                ax.axhline(np.mean([r["val_auc"] for r in rs]), color=f"C{i}", ls="--", lw=1,
                           label=f"untrained ({len(rs)} seeds)")
            continue
        if not rs:
            continue
        n = min(len(r["curve"]) for r in rs)
        steps = np.array([p["step"] for p in rs[0]["curve"][:n]])
        auc = np.array([[p["score"] for p in r["curve"][:n]] for r in rs])
        mins = np.array([[p["train_seconds"] / 60 for p in r["curve"][:n]] for r in rs]).mean(0)
        for ax, x in ((axes[0], steps), (axes[1], mins)):
            ax.plot(x, auc.mean(0), color=f"C{i}", label=f"{key} ({len(rs)} seed{'s' * (len(rs) != 1)})")
            if len(rs) > 1:
                ax.fill_between(x, auc.min(0), auc.max(0), color=f"C{i}", alpha=0.15)
    axes[0].set_xlabel("optimiser step")
    axes[1].set_xlabel("training CPU-minutes (1 thread)")
    axes[0].set_ylabel("validation probe AUC")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Step-1 convergence on {NAMES[dataset]}{f', {epochs} epochs' if epochs else ''}: linear probe of the EMA model on validation "
                 "(mean, min-max)", fontsize=9)
    fig.tight_layout()
    name = "convergence" + ("" if dataset == "breastmnist" else f"-{dataset}") + (f"-e{epochs}" if epochs else "")
    path = RESULTS / STUDY / f"{name}.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


DEFAULT = "normalized"  # today's diffusion defaults (contrastive_form normalized, uniform weighting)


def _decision(rows: list[dict]) -> list[str]:
    """The default, decided on VALIDATION only: a variant replaces it when its seed-paired validation AUC is
    higher with p < 0.05 (paired t-test over seeds); test numbers never enter."""
    from scipy.stats import ttest_rel

    from dcube.evaluate.stats import format_p, holm

    base = {r["seed"]: r["val_auc"] for r in rows if r["variant"] == DEFAULT}
    out = ["", f"Decision on validation (paired t over seeds against `{DEFAULT}`, the current default; the family: "
               "every variant below, Holm-adjusted; a variant replaces the default only at adjusted p < 0.05):", ""]
    winners, found = [], []
    for key, (label, _) in VARIANTS.items():
        if key == DEFAULT:
            continue
        mine = {r["seed"]: r["val_auc"] for r in rows if r["variant"] == key}
        seeds = sorted(set(base) & set(mine))
        if len(seeds) < 2:
            continue
        diff = [mine[s] - base[s] for s in seeds]
        found.append((key, diff, float(ttest_rel([mine[s] for s in seeds], [base[s] for s in seeds]).pvalue)))
    if not found:
        return []
    for (key, diff, p), q in zip(found, holm([p for _, _, p in found])):
        verdict = "better" if q < 0.05 and sum(diff) > 0 else "worse" if q < 0.05 else "no difference shown"
        if verdict == "better":
            winners.append((sum(diff) / len(diff), key))
        out.append(f"- `{key}` − `{DEFAULT}`: validation AUC {sum(diff) / len(diff):+.3f} "
                   f"(per seed {', '.join(f'{d:+.3f}' for d in diff)}; {format_p(p, digits=2)}, {format_p(q, 'Holm p', 2)}, {len(diff)} "
                   f"seeds): {verdict}")
    out.append("")
    out.append(f"Default: **{max(winners)[1] if winners else DEFAULT}**"
               + ("" if winners else " (kept: no variant is better on validation at Holm-adjusted p < 0.05)") + ".")
    return out


def _probe_reference(dataset: str, chosen: list[dict]) -> list[str]:
    """The issue's bar: the frozen ImageNet EfficientNet-Lite0 linear probe of `bench.accuracy` (same split)."""
    ref = [r["test"]["auc"] for r in load_results("accuracy")
           if r["dataset"] == dataset and r.get("method_id") == "linear-probe"]
    if not ref or not chosen:
        return []
    gap = np.mean([r["test_auc"] for r in chosen]) - np.mean(ref)
    return ["", f"The bar: the frozen ImageNet EfficientNet-Lite0 linear probe (`bench.accuracy`, {len(ref)} seeds) "
                f"reaches test AUC {mean_std(ref)}; step-1 features alone (`{DEFAULT}`, the chosen checkpoint, "
                f"{len(chosen)} seed{'s' * (len(chosen) != 1)}) minus it: {gap:+.3f} (means over seeds)."]


def _longer(long: list[dict], standard: list[dict]) -> list[str]:
    """Whether the longer schedule helps, on VALIDATION: its chosen probe minus the standard schedule's, same seeds."""
    from scipy.stats import ttest_rel

    from dcube.evaluate.stats import format_p

    ref = [r for r in standard if r["variant"] == DEFAULT]
    base = {r["seed"]: r["val_auc"] for r in ref}
    mine = {r["seed"]: r["val_auc"] for r in long if r["variant"] == DEFAULT}
    seeds = sorted(set(base) & set(mine))
    if not seeds:
        return []
    diff = [mine[s] - base[s] for s in seeds]
    p = (f"{format_p(float(ttest_rel([mine[s] for s in seeds], [base[s] for s in seeds]).pvalue), digits=2)} (a family of "
         "one: Holm p = p)" if len(seeds) > 1 else "one seed so far: no test")
    return ["", f"- {long[0]['epochs']} epochs − {ref[0]['epochs']} epochs (`{DEFAULT}`, "
                f"validation AUC of the chosen checkpoints): {np.mean(diff):+.3f} (per seed "
                f"{', '.join(f'{d:+.3f}' for d in diff)}; {p})"]


def _rows(rs: list[dict], label: str) -> str:
    return (f"| {label} | {len(rs)} | {rs[0]['epochs']} | {mean_std([r['val_auc'] for r in rs])} | "
            f"{mean_std([float(r['chosen_step']) for r in rs], digits=0)} | "
            f"{mean_std([r['test_auc'] for r in rs])} | {mean_std([r['train_minutes'] for r in rs])} |")


def _section(ds: str, rows: list[dict], epochs: int | None, standard: list[dict]) -> list[str]:
    """One schedule's table: the standard one (`epochs` None) with its validation decision, or a longer one
    with its comparison against the standard schedule; then the bar, the curve and the grid."""
    n = len({r["seed"] for r in rows})
    lines = [f"\n### {ds}\n"] if epochs is None else [
        f"\n### {ds}, {epochs} epochs (`--epochs {epochs}`)\n",
        f"The probe every {eval_epochs(ds, epochs)} epochs."
        + (f" **In progress: {n} of 3 seeds** (the others resume with the same command); no claim rests on it "
           "until all three are in." if n < 3 else ""), ""]
    lines += ["| variant | seeds | epochs | val AUC (chosen) | chosen step | test AUC (chosen) | training minutes |",
              "|---|---|---|---|---|---|---|"]
    lines += [_rows(rs, label) for key, (label, _) in VARIANTS.items()
              if (rs := [r for r in rows if r["variant"] == key])]
    lines += _decision(rows) if epochs is None else _longer(rows, standard)
    lines += _probe_reference(ds, [r for r in rows if r["variant"] == DEFAULT])
    path = plot(rows, ds, epochs)
    title = ds if epochs is None else f"{ds}, {epochs} epochs"
    lines += ["", f"![step-1 convergence, {title}]({path.relative_to(RESULTS.parent.parent).as_posix()})"
              if not SMOKE else f"plot: {path.name}"]
    return lines + _grid_lines(ds, rows)


def table() -> str:
    rows = load_results(STUDY)
    lines = ["## Step-1 convergence (MedMNIST, 28 px)\n",
             f"Command: `python -m bench.convergence` (resumable; `--datasets pneumoniamnist` for the "
             f"PneumoniaMNIST rows). Machine: {machine()}. `unet` tiny, a fixed length "
             "per variant; every few epochs (BreastMNIST 5, PneumoniaMNIST 1) a logistic-regression probe on the EMA "
             "model's pooled block features "
             "(fitted on training images, block and C chosen on validation) is scored on validation; the chosen "
             "checkpoint is the best on validation, and only its probe is scored on test. Mean ± std over seeds; a "
             "default may only be chosen on the validation column.\n"]
    for ds in TRAIN_SIZES:
        runs = [r for r in rows if r["dataset"] == ds]
        standard = [r for r in runs if SMOKE or r["epochs"] in (0, STANDARD_EPOCHS[ds])]
        if standard:
            lines += _section(ds, standard, None, standard)
        for epochs in sorted({r["epochs"] for r in runs} - {r["epochs"] for r in standard}):
            lines += _section(ds, [r for r in runs if r["epochs"] == epochs], epochs, standard)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=list(TRAIN_SIZES), default=["breastmnist"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    runnable = [k for k in VARIANTS if k not in ARCHIVED]
    p.add_argument("--variants", nargs="+", choices=runnable, default=runnable)
    p.add_argument("--epochs", type=int, default=None, help="default: each dataset's standard schedule "
                   f"({', '.join(f'{k} {v}' for k, v in STANDARD_EPOCHS.items())}); another length is its own table")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--grids", action="store_true", help="draw the sample grid of each finished run asked for "
                   "(the chosen checkpoint: DDPM, all steps, and DDIM-50), then the table")
    a = p.parse_args(argv)
    epochs = {ds: 1 if SMOKE else a.epochs or STANDARD_EPOCHS[ds] for ds in a.datasets}
    if a.grids:
        for ds, key, seed in product(a.datasets, a.variants, a.seeds):
            if (path := draw_grid(ds, key, seed, epochs[ds])) is not None:
                print(f"grid: {path}")
        a.table_only = True
    jobs = ((run_name(ds, key, seed, epochs[ds]), partial(untrained_run, ds, seed) if key == "untrained" else
             partial(variant_run, ds, key, seed, epochs[ds]))
            for ds in a.datasets for seed in a.seeds for key in a.variants)
    return run_study(STUDY, jobs, table, a.table_only)


if __name__ == "__main__":
    sys.exit(main())
