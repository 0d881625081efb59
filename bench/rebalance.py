"""Rebalancing study: does topping up the minority class with D-Cube step-1 samples help a plain CNN?

BreastMNIST (28 px, official split; minority = malignant, 147 of 546 training images). A step-1
model is trained on the TRAIN split only, once per generator length (GENERATORS: a short and a
long schedule). Its sampler is chosen by per-class FID against the TRAIN images (SAMPLERS, the
same number of images each); samples of that sampler top malignant up to the benign count; a
ResNet-18 (MONAI, MedMNIST 28-px stem) is trained on real vs real + synthetic images, several
seeds each, best epoch on validation AUC, test metrics reported and paired on the test images.

    python -m bench.rebalance                 # resumable: finished runs are skipped
    python -m bench.rebalance --table-only    # regenerate the BENCHMARKS.md section

Schedules are shortened to fit a shared 2-core CPU (see SCHEDULE); the table says so.
Outputs: bench/results/rebalance/{synthesis[-long],real-s<seed>,real_synthetic[-long]-s<seed>}.json
(committed); checkpoints, PNG samples and the real-vs-generated grids under
bench/results/rebalance/runs/ (ignored).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import torch

from bench.accuracy import data_path
from bench.common import (RESULTS, SMOKE, STATS, has_probs, load_results, machine, mean_std, paired_cell, run_study,
                          shrink)
from dcube.utils.io import atomic_write_bytes

STUDY = "rebalance"
RUNS = RESULTS / STUDY / "runs"
SCHEDULE = {
    "diffusion": {"backbone": "unet", "preset": "tiny", "batch_size": 32, "lr": 1e-3,
                  "class_dropout": 0.1, "sample_grid": False, "checkpoint_every": 300},
    "sampling": {"guidance": 0.0, "seed": 0, "batch_size": 250, "images": 500, "minority_share": 0.6},
    "baseline": {"model": "resnet18", "epochs": 8, "batch_size": 64, "lr": 1e-3},
}
GENERATORS = {"short": 15, "long": 300, "longer": 500}  # step-1 epochs per generator ("short": dcube 0.1's schedule)
SAMPLERS = {"candidates": [["ddim", 50], ["ddim", 250]], "per_class": 100, "seed": 1}  # chosen on TRAIN FID
if SMOKE:  # a tiny slice, seconds: the smoke test of this study
    SCHEDULE = {"diffusion": {**SCHEDULE["diffusion"], "preset": "micro", "max_steps": 2},
                "sampling": {**SCHEDULE["sampling"], "images": 24, "batch_size": 24},
                "baseline": {**SCHEDULE["baseline"], "epochs": 1}}
    GENERATORS = {"short": 1, "long": 1, "longer": 2}
    SAMPLERS = {"candidates": [["ddim", 2], ["ddim", 3]], "per_class": 4, "seed": 1}
COMMAND = "nohup .venv/bin/python -m bench.rebalance > bench/results/rebalance/log.txt 2>&1 &"


def bundle():
    from dcube.config import DataConfig
    from dcube.data import load_data

    return load_data(DataConfig(**data_config()), seed=0)


def data_config() -> dict:
    return shrink({"data": {"name": "breastmnist", "path": data_path("breastmnist"), "download": False}})["data"]


def suffix(gen: str) -> str:
    """File-name suffix of a generator ("short" keeps the names of dcube 0.1's runs)."""
    return "" if gen == "short" else f"-{gen}"


def diffusion_schedule(gen: str) -> dict:
    return {**SCHEDULE["diffusion"], "epochs": GENERATORS[gen]}


def step1(data, gen: str):
    from dcube.config import DiffusionConfig
    from dcube.diffusion.trainer import train_diffusion

    from dcube.diffusion.trainer import LAST

    cfg = DiffusionConfig(**diffusion_schedule(gen))
    out = RUNS / f"step1{suffix(gen)}"
    shorter = [g for g in GENERATORS if GENERATORS[g] < GENERATORS[gen]]
    prefix = RUNS / f"step1{suffix(shorter[-1])}" / LAST if shorter else None
    if prefix and prefix.exists() and not (out / LAST).exists():
        # a longer run of the same schedule resumes from the shorter one's end: with a constant lr and
        # per-epoch seeded batch orders its first steps ARE that run, so this saves them, bit for bit
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / LAST, prefix.read_bytes())
    return train_diffusion(cfg, data.train.images, data.train.labels, data.num_classes, out, seed=0)


def choose_sampler(data, ckpt, gen: str, extractor, real_features) -> dict:
    """Every candidate sampler draws `per_class` images of each class from the same seed; the one with
    the lowest mean per-class FID against the TRAIN images (their features: `real_features`) is chosen (never
    validation or test)."""
    from dcube.diffusion.sampling import sample_images
    from dcube.diffusion.trainer import load_denoiser
    from dcube.evaluate.fidelity import per_class_fidelity
    from dcube.generate.grid import save_real_vs_generated

    model, cfg = load_denoiser(ckpt)
    labels = torch.arange(data.num_classes).repeat_interleave(SAMPLERS["per_class"])
    rows = []
    for sampler, steps in SAMPLERS["candidates"]:
        t0 = time.time()
        imgs = sample_images(model, cfg, labels, sampler=sampler, steps=steps, seed=SAMPLERS["seed"],
                             batch_size=SCHEDULE["sampling"]["batch_size"], desc=f"{sampler}-{steps}")
        wall = time.time() - t0
        fid = per_class_fidelity(data.train.images, data.train.labels, imgs, labels, data.class_names, extractor,
                                 real_features=real_features)
        save_real_vs_generated(data.train.images, data.train.labels, imgs, labels, data.class_names,
                               RUNS / f"candidates{suffix(gen)}-{sampler}{steps}.png")
        per = {k: v["fid"] for k, v in fid["per_class"].items() if "fid" in v}
        rows.append({"sampler": sampler, "steps": steps, "seconds": round(wall, 1), "fid_per_class": per,
                     "kid_per_class": {k: v["kid_mean"] for k, v in fid["per_class"].items() if "kid_mean" in v},
                     "mean_fid": sum(per.values()) / len(per)})
    best = min(rows, key=lambda r: r["mean_fid"])  # a tie keeps the first (the cheaper) candidate
    return {**SAMPLERS, "candidates": rows, "chosen": [best["sampler"], best["steps"]]}


def synthesis(data, gen: str) -> dict:
    """The generator's sampler chosen on TRAIN FID, then `images` samples of it (timed): the top-up
    images, per-class FID/KID and the grid."""
    from dcube.evaluate.fidelity import build_extractor, extract_features, format_fidelity, per_class_fidelity
    from dcube.generate import balance_counts, synthesize
    from dcube.generate.grid import save_real_vs_generated
    from dcube.generate.synthetic import train_fingerprint

    ckpt = step1(data, gen)
    extractor = build_extractor(size=64 if SMOKE else 224)  # the FID extractor's input side: small in the smoke test
    real = extract_features(extractor, data.train.images, desc="features (TRAIN images)")  # once for every FID below
    choice = choose_sampler(data, ckpt, gen, extractor, real)
    sampler, steps = choice["chosen"]
    s = {**SCHEDULE["sampling"], "sampler": sampler, "steps": steps}
    counts = data.train.labels.bincount().tolist()
    minority = min(range(len(counts)), key=counts.__getitem__)
    topup = balance_counts(counts)
    n_min = max(topup[minority], round(s["images"] * s["minority_share"]))
    gen_counts = [n_min if c == minority else s["images"] - n_min for c in range(len(counts))]
    t0 = time.time()
    synth = synthesize(ckpt, gen_counts, RUNS / f"synthetic{suffix(gen)}", data.class_names, train_fingerprint(data.train),
                       sampler=s["sampler"], steps=s["steps"], guidance=s["guidance"], seed=s["seed"],
                       batch_size=s["batch_size"], overwrite=True)
    wall = time.time() - t0
    fid = per_class_fidelity(data.train.images, data.train.labels, synth.images, synth.labels, data.class_names,
                             extractor, real_features=real)
    print(format_fidelity(fid))
    save_real_vs_generated(data.train.images, data.train.labels, synth.images, synth.labels, data.class_names,
                           RESULTS / STUDY / f"real_vs_generated{suffix(gen)}.png")  # committed: the grid people look at
    return {"study": STUDY, "kind": "synthesis", "generator": gen,
            "schedule": {**SCHEDULE, "diffusion": diffusion_schedule(gen), "sampling": s},
            "sampler_choice": choice, "generated_counts": gen_counts,
            "train_counts": counts, "minority": data.class_names[minority], "topup_counts": topup,
            "sampling_seconds": synth.info["sampling_seconds"], "synthesize_wall_s": round(wall, 1),
            "threads": torch.get_num_threads(), "fidelity": fid, "synthetic_info": synth.info}


def topup_set(data, gen: str):
    """The synthetic images actually added: the first `topup` minority images of the set."""
    from dcube.generate import SyntheticSet, balance_counts, load_synthetic

    full = load_synthetic(RUNS / f"synthetic{suffix(gen)}")
    topup = balance_counts(data.train.labels.bincount().tolist())
    keep = torch.cat([torch.nonzero(full.labels == c).flatten()[:k] for c, k in enumerate(topup)])
    return SyntheticSet(full.images[keep], full.labels[keep], [full.ids[i] for i in keep.tolist()],
                        full.class_names, full.info)


def train_arm(data, seed: int, gen: str | None = None) -> dict:
    """ResNet-18 on the real images (`gen` None) or on them plus `gen`'s top-up images."""
    from dcube.classify.baseline import BaselineConfig, train_baseline
    from dcube.evaluate import compute_metrics, select_score

    cfg = BaselineConfig(**SCHEDULE["baseline"])
    synth = topup_set(data, gen) if gen else None
    score = lambda y, p: select_score(compute_metrics(y, p, data.class_names), "auc")  # noqa: E731
    out = train_baseline(cfg, data, RUNS / f"{arm_key(gen)}-s{seed}", score, seed=seed, synthetic=synth)
    test = compute_metrics(data.test.labels, out["test_probs"], data.class_names)
    return {"study": STUDY, "kind": "arm", "arm": "real" if gen is None else "real+synthetic", "generator": gen, "seed": seed,
            "schedule": SCHEDULE["baseline"], "data_config": data_config(),
            "test_probs": out["test_probs"].tolist(),
            "best_epoch": out["best_epoch"], "val_auc": out["val_score"], "history": out["history"],
            "n_train_real": out["n_train_real"], "n_train_synthetic": out["n_train_synthetic"],
            "train_seconds": out["train_seconds"], "test": test}


def arm_key(gen: str | None) -> str:
    return "real" if gen is None else f"real_synthetic{suffix(gen)}"


def table() -> str:
    rows = load_results(STUDY)
    syns = {r.get("generator", "short"): r for r in rows if r.get("kind") == "synthesis"}
    arms = [r for r in rows if r.get("kind") == "arm"]
    sd, sb = SCHEDULE["diffusion"], SCHEDULE["baseline"]
    gens = ", ".join(f"{g} = {e} epochs" for g, e in GENERATORS.items())
    n_train = sum(next(iter(syns.values()))["train_counts"]) if syns else 546
    lines = ["## Rebalancing BreastMNIST with synthetic malignant images\n",
             f"Command: `{COMMAND}` (resumable; one JSON per run in `bench/results/rebalance/`; "
             "`python -m bench.rebalance --table-only` regenerates this section). "
             f"Machine: {machine()}, shared with other jobs.\n",
             f"Schedule (CPU budget): step 1 = {sd['backbone']} `{sd['preset']}` preset ({gens}; batch "
             f"{sd['batch_size']}, lr {sd['lr']}, class_dropout {sd['class_dropout']}, the contrastive default) on "
             f"the {n_train} TRAIN images only. Per generator, the sampler is chosen among "
             f"{', '.join(f'{a.upper()}-{b}' for a, b in SAMPLERS['candidates'])} by the lowest mean per-class FID "
             f"of {SAMPLERS['per_class']} images per class against the TRAIN images (never validation or test). "
             f"ResNet-18 (MONAI, 28-px stem, random init) {sb['epochs']} epochs, Adam lr {sb['lr']}, batch "
             f"{sb['batch_size']}, best epoch on validation AUC. The paper trains step 1 for hundreds of epochs "
             "on a GPU; read the short generator as a pipeline check.\n",
             "FID/KID: real = TRAIN images of the class; features of EfficientNet-Lite0 (ImageNet), NOT "
             "Inception: not comparable with published FIDs, and biased upwards with fewer images than its 1280 "
             "feature dimensions, so compare a FID only with one from the same numbers of images.\n"]
    for gen in GENERATORS:
        syn = syns.get(gen)
        if syn:
            lines += _synthesis_lines(gen, syn)
    if arms:
        minority = next(iter(syns.values()))["minority"] if syns else "malignant"
        n_test = len(arms[0]["test_probs"]) if "test_probs" in arms[0] else 156
        lines += [f"\n### ResNet-18 on the test split ({n_test} images), mean ± std over seeds\n",
                  f"| training set | seeds | train images (real + synthetic) | macro-F1 | {minority} recall | AUC | "
                  "accuracy | date |", "|---|---|---|---|---|---|---|---|"]
        groups = {None: "real"} | {g: f"real + synthetic ({g} generator, {GENERATORS[g]} epochs)" for g in GENERATORS}
        picked = {}
        for gen, label in groups.items():
            rs = sorted([r for r in arms if r.get("generator", "short" if r["arm"] != "real" else None) == gen],
                        key=lambda r: r["seed"])
            if not rs:
                continue
            picked[gen] = rs
            lines.append(
                f"| {label} | {len(rs)} ({', '.join(str(r['seed']) for r in rs)}) | "
                f"{rs[0]['n_train_real']} + {rs[0]['n_train_synthetic']} | "
                f"{mean_std([r['test']['f1_macro'] for r in rs])} | "
                f"{mean_std([r['test']['per_class'][minority]['recall'] for r in rs])} | "
                f"{mean_std([r['test']['auc'] for r in rs])} | {mean_std([r['test']['accuracy'] for r in rs])} | "
                f"{rs[-1]['date']} |")
        lines.append("\nAUC uses the score of class 1 ('normal, benign'), the MedMNIST convention.")
        order = list(GENERATORS)
        pairs = [(g, None) for g in order] + list(zip(order[1:], order[:-1]))  # each generator against the shorter one
        out = []
        for a, b in pairs:
            if a in picked and b in picked and has_probs(picked[a] + picked[b]):
                name = lambda g: "real" if g is None else f"real + {g} synthetic"  # noqa: E731
                out.append(f"- {name(a)} minus {name(b)}: macro-F1 {paired_cell(picked[a], picked[b], 'f1_macro')}; "
                           f"AUC {paired_cell(picked[a], picked[b], 'auc')}")
        if out:
            lines += [f"\nPaired on the same test images (seed-mean difference, 95 % CI, p; {STATS}):\n", *out]
    return "\n".join(lines)


def _synthesis_lines(gen: str, syn: dict) -> list[str]:
    s, fid, sd = syn["schedule"]["sampling"], syn["fidelity"], syn["schedule"]["diffusion"]
    n = syn["synthetic_info"]["images"]
    lines = [f"\n### The {gen} generator: {sd['epochs']} step-1 epochs (date {syn['date']})\n"]
    choice = syn.get("sampler_choice")
    if choice:
        classes = list(choice["candidates"][0]["fid_per_class"])
        lines += [f"Sampler choice ({choice['per_class']} images per class, seed {choice['seed']}; FID against "
                  "the TRAIN images):\n",
                  "| sampler | seconds | " + " | ".join(f"FID {c}" for c in classes) + " | mean FID | |",
                  "|---|---|" + "---|" * len(classes) + "---|---|"]
        for c in choice["candidates"]:
            mark = "chosen" if [c["sampler"], c["steps"]] == choice["chosen"] else ""
            lines.append(f"| {c['sampler'].upper()}-{c['steps']} | {c['seconds']:.0f} | "
                         + " | ".join(f"{c['fid_per_class'][k]:.1f}" for k in classes)
                         + f" | {c['mean_fid']:.1f} | {mark} |")
        lines.append("")
    lines += [f"{n} images of the chosen {s['sampler'].upper()}-{s['steps']} (guidance {s['guidance']}) in "
              f"**{syn['sampling_seconds']:.0f} s** (batch {s['batch_size']}, {syn['threads']} torch threads):\n",
              "| class | real | generated | FID | KID (mean ± std) |", "|---|---|---|---|---|"]
    for name, r in fid["per_class"].items():
        if "fid" in r:
            lines.append(f"| {name} | {r['n_real']} | {r['n_generated']} | {r['fid']:.2f} | "
                         f"{r['kid_mean']:.4f} ± {r['kid_std']:.4f} |")
    grid = RESULTS / STUDY / f"real_vs_generated{suffix(gen)}.png"
    if grid.exists():
        lines += ["", f"Real (odd rows) next to generated (even rows), per class:\n",
                  f"![real vs generated, {gen} generator](bench/results/{STUDY}/{grid.name})"]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine oversubscribed by 2 threads ran 40x slower)")
    p.add_argument("--generators", nargs="+", choices=list(GENERATORS), default=list(GENERATORS))
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)

    def jobs():  # a generator: --table-only never loads the data
        torch.set_num_threads(a.threads)
        data = bundle()
        for gen in a.generators:
            yield f"synthesis{suffix(gen)}", partial(synthesis, data, gen)
        for seed in a.seeds:
            for gen in (None, *a.generators):
                yield f"{arm_key(gen)}-s{seed}", partial(train_arm, data, seed, gen)

    return run_study(STUDY, jobs(), table, a.table_only)


if __name__ == "__main__":
    sys.exit(main())
