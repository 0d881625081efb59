"""Speed and memory on this machine, measured side by side in one command.

    python -m bench.speed [--parts ...]     # resumable: one JSON per measurement
    python -m bench.speed --table-only

- step-1 training images/s, U-ViT and UNet (`tiny` presets), 28 and 64 px (the real trainer:
  contrastive pairs, EMA; random images, the speed does not depend on their content);
- feature extraction images/s (every block hooked);
- a step-2 epoch on BreastMNIST against a step-1 epoch on the same images, for today's default,
  the frozen sub-feature CNN options and dcube 0.1, and with the hyper-features recomputed every
  epoch as the published code does (= extraction + the same epoch);
- peak RSS of each measurement: each runs in its own fresh process (spawn), so the numbers do
  not include each other;
- wall time of the whole PneumoniaMNIST pipeline: read from the accuracy study's runs.
Timings are one torch thread unless `--threads`; they move with whatever else shares the CPU, so
the table records the load average seen at the start of each measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial

from bench.accuracy import SCHEDULES, data_path
from bench.common import SMOKE, load_results, machine, peak_rss_mb, run_study
from bench.step2 import LEAN

STUDY = "speed"
STEPS = 3 if SMOKE else 12  # timed optimiser steps (after one warm-up step)
BATCH = 32


def _child(fn_name: str, args: tuple, threads: int, queue) -> None:
    import torch

    torch.set_num_threads(threads)
    out = globals()[fn_name](*args)
    out["peak_rss_mb"] = peak_rss_mb()  # this child's (run_once keeps it)
    queue.put(out)


def in_fresh_process(fn_name: str, args: tuple, threads: int) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    load = round(os.getloadavg()[0], 2)
    p = ctx.Process(target=_child, args=(fn_name, args, threads, q))
    p.start()
    out = q.get()
    p.join()
    return {**out, "threads": threads, "load_avg_1min": load}


def step1(backbone: str, size: int) -> dict:
    import torch

    from dcube.config import DiffusionConfig
    from dcube.diffusion.trainer import train_diffusion

    preset = "micro" if SMOKE else "tiny"
    x = torch.rand((STEPS + 1) * BATCH, 1, size, size) * 2 - 1
    y = torch.arange(len(x)) % 2
    with tempfile.TemporaryDirectory() as d:
        cfg = DiffusionConfig(backbone=backbone, preset=preset, batch_size=BATCH, max_steps=1, sample_grid=False,
                              checkpoint_every=10 ** 6)
        train_diffusion(cfg, x, y, 2, d)  # warm-up step (allocations, first checkpoint)
        cfg.max_steps = STEPS + 1
        t0 = time.perf_counter()
        train_diffusion(cfg, x, y, 2, d)
        dt = time.perf_counter() - t0
    return {"backbone": backbone, "preset": preset, "size": size, "images": STEPS * BATCH,
            "images_per_s": STEPS * BATCH / dt}


def _breast(n: int | None = None):
    from dcube.config import DataConfig
    from dcube.data import load_data

    return load_data(DataConfig(name="breastmnist", path=data_path("breastmnist"), download=False,
                                max_train=n, max_val=n, max_test=n), 0)


def extraction(size: int = 28) -> dict:
    import torch

    from dcube.config import DiffusionConfig, FeatureConfig
    from dcube.diffusion import build_denoiser
    from dcube.features import extract

    model = build_denoiser(DiffusionConfig(preset="micro" if SMOKE else "tiny"), 1, size, 2)
    x = torch.rand(64 if SMOKE else 512, 1, size, size) * 2 - 1
    extract(model, x[:32], model.feature_names, FeatureConfig(), progress=False)  # warm-up
    t0 = time.perf_counter()
    extract(model, x, model.feature_names, FeatureConfig(), progress=False)
    return {"size": size, "layers": len(model.feature_names), "images": len(x),
            "images_per_s": len(x) / (time.perf_counter() - t0)}


STEP2_EPOCHS = 2 if SMOKE else 3  # timed step-2 runs: epochs 2.. are the steady state, the first pays one-offs
# dcube 0.1's step 2 (its softmax scores were removed in 1.0): a stored row, not run again
V01 = {"score_norm": "softmax", "fuse_size": 8, "flip_augment": False, "cycle_form": "soft", "cycle_weight": 0.1}
# rows whose settings left the configuration in dcube 1.0 (CHANGELOG.md): stored, not run again
ARCHIVED = {"v01", "frozen6", "frozen11", "lean", "in32", "fast"}
STEP2_ROWS = {  # key -> (label, classifier overrides of the accuracy study's BreastMNIST settings)
    "frozen0": ("no cycle loss (the default since 2026-12-03), sub-feature CNN fine-tuned whole "
                "(`cnn_frozen_blocks: 0`), contiguous layout (`compute.channels_last: no`)", {}),
    "cl": ("the same in channels-last memory format (`compute.channels_last: step2`, the default since 2026-12-03)",
           {"_channels_last": True}),
    "frozen6": ("stem + blocks 0-5 frozen and cached (`cnn_frozen_blocks: 6`)", {"cnn_frozen_blocks": 6}),
    "frozen11": ("the CNN frozen, its sub-features cached (`cnn_frozen_blocks: 11`)", {"cnn_frozen_blocks": 11}),
    "lean": ("8 cycle + 16 flip-consistency images per step, BN recalibration on 256 (`bench.step2` lean)", LEAN),
    "in32": ("EfficientNet at 32 px instead of 64 (`classifier.cnn_input_size: 32`)", {"cnn_input_size": 32}),
    "fast": ("both: EfficientNet at 32 px and the lean batches (`bench.step2` fast)", {**LEAN, "cnn_input_size": 32}),
    "v01": ("dcube 0.1's step 2 (softmax scores, fuse 8, no flips, soft cycle x0.1)", V01),
    # "_": what is not a ClassifierConfig key. With a cycle loss, the trainer measures its gradient share on the
    # first batch of epochs 1, 2, 4, 8, ... and the last, so all 3 timed epochs here pay it, 10 of 15 in BreastMNIST not
    "cyc10": ("the soft cycle loss x10 (the default before 2026-12-03)", {"cycle_weight": 10.0}),
    "cyc10_noratio": ("the soft cycle loss x10, an epoch that does not measure its gradient share",
                      {"cycle_weight": 10.0, "_no_ratio": True}),
}
RATIO_EPOCHS = 15  # the accuracy study's BreastMNIST step 2 (trainer.ratio_epoch says which epochs measure)


def _step1_epoch(data, channels_last: bool = False) -> float:
    """Seconds of one step-1 epoch on these training images (dcube's defaults: unet `tiny`, batch 64,
    contrastive), the steady state of a 3-epoch run (its first epoch pays one-off costs)."""
    from dcube.config import ComputeConfig, DiffusionConfig
    from dcube.diffusion.trainer import train_diffusion

    stamps = []
    with tempfile.TemporaryDirectory() as d:
        cfg = DiffusionConfig(preset="micro" if SMOKE else "tiny", epochs=3, sample_grid=False)
        train_diffusion(cfg, data.train.images, data.train.labels, 2, d, compute=ComputeConfig(channels_last=channels_last),
                        on_step=lambda s: stamps.append(time.perf_counter()))
    per = len(stamps) // 3
    return (stamps[-1] - stamps[per - 1]) / 2


def step2_epoch() -> dict:
    """A step-2 epoch on BreastMNIST against a step-1 epoch on the same images (issue 12 item 6), for
    today's default, the frozen sub-feature CNN options and dcube 0.1's step 2; and the extraction that
    recomputing the features every epoch (the published code) would add."""
    from dcube.classify import trainer
    from dcube.classify.trainer import FeatureSplit, train_classifier
    from dcube.config import ClassifierConfig, ComputeConfig, DiffusionConfig, FeatureConfig
    from dcube.diffusion import build_denoiser
    from dcube.diffusion.schedule import ddpm_scheduler
    from dcube.features import extract

    data = _breast(48 if SMOKE else None)
    dcfg = DiffusionConfig(preset="micro" if SMOKE else "tiny")
    model = build_denoiser(dcfg, 1, 28, 2)
    names = model.feature_names[-2:]  # two blocks, like a typical KS selection
    fc = FeatureConfig()
    t0 = time.perf_counter()
    feats = extract(model, data.train.images, names, fc, progress=False)
    flipped = extract(model, data.train.images.flip(-1), names, fc, progress=False)
    val = extract(model, data.val.images, names, fc, progress=False)
    t_extract = time.perf_counter() - t0  # train, its flips and val: what recomputing repeats each epoch
    train = FeatureSplit([feats[n] for n in names], data.train.images, data.train.labels, [flipped[n] for n in names])
    vsplit = FeatureSplit([val[n] for n in names], data.val.images, data.val.labels)
    score = lambda y, p: (0.0, 0.0)  # noqa: E731  (timing only)
    keys = ("frozen0",) if SMOKE else tuple(k for k in STEP2_ROWS if k not in ARCHIVED)
    runs = [("warm-up", {"cycle_weight": 0.1}), *((k, STEP2_ROWS[k][1]) for k in keys)]
    epoch_s, oneoff_s = {}, {}
    measured = trainer.ratio_epoch
    for name, over in runs:
        cc = ClassifierConfig(**{**SCHEDULES["breastmnist"]["classifier"],
                                 **{k: v for k, v in over.items() if not k.startswith("_")}})
        cc.epochs = STEP2_EPOCHS
        trainer.ratio_epoch = (lambda epoch, epochs: False) if over.get("_no_ratio") else measured
        stamps = []
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            train_classifier(cc, train, vsplit, data.class_names, d, score, denoiser=model,
                             scheduler=ddpm_scheduler(dcfg), device="cpu",
                             compute=ComputeConfig(channels_last=bool(over.get("_channels_last"))),
                             on_epoch=lambda e: stamps.append(time.perf_counter()))
        epoch_s[name] = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        oneoff_s[name] = stamps[0] - t0 - epoch_s[name]
    return {"train_images": len(data.train), "val_images": len(data.val), "layers": names, "extract_s": t_extract,
            "step1_epoch_s": _step1_epoch(data), "step1_epoch_cl_s": _step1_epoch(data, channels_last=True),
            "step2_epoch_s": epoch_s, "step2_oneoff_s": oneoff_s,
            "timed_epochs": STEP2_EPOCHS}


PARTS = {
    **{f"step1-{b}-{s}": ("step1", (b, s)) for b in ("unet", "uvit") for s in (28, 64)},
    "extract-28": ("extraction", (28,)),
    "step2-vs-step1": ("step2_epoch", ()),
}


def table() -> str:
    res = {r["key"]: r for r in load_results(STUDY)}
    lines = ["## Speed and memory\n",
             f"Command: `python -m bench.speed`. Machine: {machine()}. One torch thread per measurement, each in a "
             "fresh process (peak RSS is that process's); `load` is the 1-minute load average when it started "
             "(other jobs shared the CPU when it is above ~1).\n",
             "| measurement | images/s | peak RSS (MB) | load | date |", "|---|---|---|---|---|"]
    for key in PARTS:
        r = res.get(key)
        if not r or "images_per_s" not in r:
            continue
        what = (f"step-1 training, {r['backbone']} `{r['preset']}`, {r['size']} px, batch {BATCH}" if key.startswith("step1")
                else f"feature extraction, {r['layers']} blocks, {r['size']} px")
        lines.append(f"| {what} | {r['images_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['load_avg_1min']} | {r['date']} |")
    s = res.get("step2-vs-step1")
    if s:
        e, o, one = s["step2_epoch_s"], s["step2_oneoff_s"], s["step1_epoch_s"]
        lines += ["", f"A step-2 epoch against a step-1 epoch on the same BreastMNIST images ({s['train_images']} training, "
                  f"{s['val_images']} validation; issue 12 item 6). One process, one thread, load {s['load_avg_1min']}, "
                  f"{s['date']}. Step 1: dcube's defaults (unet `tiny`, batch 64, contrastive). Step 2: the accuracy "
                  f"study's BreastMNIST settings, D-Cube head with EfficientNet-Lite0 sub-features, blocks "
                  f"{', '.join(s['layers'])} (a random step-1 model: the cost does not depend on its weights). "
                  f"*Seconds per epoch*: the mean of epochs 2-{s['timed_epochs']} of one run; *once per run*: what "
                  f"the first epoch took beyond that (setup, and the frozen CNN part's outputs for train, flipped train "
                  f"and val). Peak RSS {s['peak_rss_mb']:.0f} MB.\n",
                  "| step 2 | seconds per epoch | / step-1 epoch | once per run (s) |", "|---|---|---|---|",
                  f"| step 1 (reference) | {one:.1f} | 1.00 | - |"]
        for k, (label, _) in STEP2_ROWS.items():
            if k in e:
                lines.append(f"| {label} | {e[k]:.1f} | {e[k] / one:.2f} | {o[k]:.1f} |")
        lines.append(f"| features recomputed every epoch (the published code), fine-tuned CNN | "
                     f"{e['frozen0'] + s['extract_s']:.1f} | {(e['frozen0'] + s['extract_s']) / one:.2f} | - |")
        if "step1_epoch_cl_s" in s:
            lines.append(f"| step 1 in channels-last memory format | {s['step1_epoch_cl_s']:.1f} | "
                         f"{s['step1_epoch_cl_s'] / one:.2f} | - |")
        from dcube.classify.trainer import ratio_epoch

        measured = [i + 1 for i in range(RATIO_EPOCHS) if ratio_epoch(i, RATIO_EPOCHS)]
        k = len(measured)
        if "cyc10" in e and "cyc10_noratio" in e:
            avg = (k * e["cyc10"] + (RATIO_EPOCHS - k) * e["cyc10_noratio"]) / RATIO_EPOCHS
            lines += ["", f"Over a {RATIO_EPOCHS}-epoch BreastMNIST step 2, whose epochs {', '.join(map(str, measured))} "
                      f"({k} of {RATIO_EPOCHS}) measure the cycle term's gradient share (before 2026-12-02: every "
                      f"epoch), an epoch with the soft cycle loss x10 costs on average: {avg:.1f} s "
                      f"({avg / one:.2f} step-1 epochs)."]
    acc = [r for r in load_results("accuracy") if r.get("dataset") == "pneumoniamnist" and r.get("method") == "D-Cube"]
    if acc:
        lines += ["", "Whole PneumoniaMNIST pipeline (accuracy study, shortened schedule): "
                  + "; ".join(f"seed {r['seed']}: {r['wall_s'] / 60:.1f} min (peak RSS {r['peak_rss_mb']:.0f} MB)"
                              for r in acc) + "."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    jobs = ((key, partial(in_fresh_process, *PARTS[key], a.threads)) for key in a.parts)
    return run_study(STUDY, jobs, table, a.table_only)


if __name__ == "__main__":
    sys.exit(main())
