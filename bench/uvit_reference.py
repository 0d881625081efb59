"""dcube's U-ViT against the reference U-ViT, step-1 training speed on this CPU (issue 11, item 6).

    python -m bench.uvit_reference --reference DIR [--rounds 6] [--steps 5] [--table-only]

DIR is a checkout of github.com/baofff/U-ViT (Bao et al. 2023): its ``libs/uvit.py`` is imported
from there for the measurement; none of it is part of dcube, and without DIR the study stops with
a one-line error. Same model on both sides: embed 128, depth 7, 4 heads, MLP ratio 4, patch 2,
28 px, 1 channel, 2 classes (the reference with its MLP time embedding and label embedding; its
default ``qkv_bias=False``), batch 64, AdamW, noise MSE on random images (the speed does not depend
on their content). Variants, timed alternately in one process (each round runs every variant for
`steps` optimiser steps, after one untimed warm-up round), so a load change hits them alike:

- ``reference``: the reference module, eager;
- ``dcube``: :class:`dcube.diffusion.uvit.UViT`, eager (dcube's default);
- ``dcube, compiled``: through :func:`dcube.utils.compute.training_module` with ``compute.compile``;
- ``dcube, bf16``: ``compute.mixed_precision: bf16`` autocast (this CPU has AVX512-BF16; it changes the
  arithmetic, so it is an option, not the default).

Images/s is the median over rounds; the ratio is against the reference's median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench.common import SMOKE, THREADS, load_results, machine, run_study

STUDY = "uvit_reference"
MODEL = dict(embed_dim=32, depth=3, num_heads=2, mlp_ratio=4.0) if SMOKE else \
    dict(embed_dim=128, depth=7, num_heads=4, mlp_ratio=4.0)
SIZE, BATCH, PATCH = 28, 8 if SMOKE else 64, 2
# the smoke test skips torch.compile (tens of seconds of compiling for one step)
VARIANTS = ("reference", "dcube", "dcube, bf16") if SMOKE else ("reference", "dcube", "dcube, compiled", "dcube, bf16")


def _reference_module(root: Path):
    """The reference UViT class, imported from a checkout (its libs/ package)."""
    if not (root / "libs" / "uvit.py").is_file():
        raise SystemExit(f"--reference: {root} has no libs/uvit.py (a checkout of github.com/baofff/U-ViT)")
    sys.path.insert(0, str(root))
    try:
        from libs.uvit import UViT
    finally:
        sys.path.remove(str(root))
    return UViT


def _trainers(ref_cls) -> dict:
    """variant -> step(): one optimiser step of that variant."""
    import torch
    import torch.nn.functional as F

    from dcube.config import ComputeConfig
    from dcube.diffusion.uvit import UViT
    from dcube.utils.compute import Precision, training_module

    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, SIZE, SIZE, generator=g)
    noise = torch.randn(BATCH, 1, SIZE, SIZE, generator=g)
    t = torch.randint(0, 1000, (BATCH,), generator=g)
    y = torch.randint(0, 2, (BATCH,), generator=g)
    onehot = F.one_hot(y, 2).float()

    def make(model, call, precision="no"):
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
        amp = Precision(precision, "cpu")

        def step():
            opt.zero_grad(set_to_none=True)
            with amp.autocast():
                out = call(model)
            F.mse_loss(out.float(), noise).backward()
            opt.step()

        return step

    torch.manual_seed(0)
    ref = ref_cls(img_size=SIZE, patch_size=PATCH, in_chans=1, mlp_time_embed=True, num_classes=2, **MODEL)
    dc = [UViT(1, SIZE, 2, patch_size=PATCH, **MODEL) for _ in range(3)]
    trainers = {
        "reference": make(ref, lambda m: m(x, t, y)),
        "dcube": make(dc[0], lambda m: m(x, t, onehot)),
        "dcube, bf16": make(dc[2], lambda m: m(x, t, onehot), "bf16"),
    }
    if "dcube, compiled" in VARIANTS:
        compiled = training_module(dc[1], ComputeConfig(compile=True))
        trainers["dcube, compiled"] = make(dc[1], lambda m: compiled(x, t, onehot))
    return trainers, {"reference": sum(p.numel() for p in ref.parameters()), "dcube": sum(p.numel() for p in dc[0].parameters())}


def measure(reference: Path, rounds: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    steps_fn, params = _trainers(_reference_module(reference))
    for fn in steps_fn.values():  # warm-up (and the compile)
        fn()
    per = {v: [] for v in VARIANTS}
    load = round(os.getloadavg()[0], 2)
    for _ in range(rounds):
        for v in VARIANTS:
            t0 = time.perf_counter()
            for _ in range(steps):
                steps_fn[v]()
            per[v].append(steps * BATCH / (time.perf_counter() - t0))
    med = {v: statistics.median(s) for v, s in per.items()}
    return {"profile_dcube_eager": _profile(steps_fn["dcube"]), "study": STUDY, "model": MODEL, "image_size": SIZE, "batch": BATCH, "patch": PATCH, "rounds": rounds,
            "steps_per_round": steps, "threads": THREADS, "load_avg_1min": load, "parameters": params,
            "images_per_s": per, "median_images_per_s": med,
            "ratio_to_reference": {v: med[v] / med["reference"] for v in VARIANTS},
            "torch": torch.__version__}


def _profile(step) -> dict:
    """Shares of self CPU time of one eager dcube step (torch.profiler): where an fp32 speed-up could come from."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(ops.values())
    groups = {"matmul (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
              "attention (scaled_dot_product)": tuple(k for k in ops if "scaled_dot_product" in k)}
    return {g: sum(ops.get(k, 0) for k in keys) / total for g, keys in groups.items()}


def table() -> str:
    rows = sorted(load_results(STUDY), key=lambda r: r["date"])
    lines = [f"## dcube's U-ViT against the reference U-ViT (step-1 training speed)\n\nCommand: `python -m bench.uvit_reference "
             f"--reference <checkout of baofff/U-ViT>`. Machine: {machine()}. Embed 128, depth 7, 4 heads, patch 2, 28 px, "
             "batch 64, AdamW, noise MSE; the variants alternate in one process (rounds x steps below), images/s is the "
             "median over rounds. The goal (issue 11): dcube at >= 1.2x the reference.\n",
             "| variant | images/s (median) | min-max over rounds | x reference | parameters | rounds x steps | threads | load | date |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for v in r["median_images_per_s"]:
            s = r["images_per_s"][v]
            p = r["parameters"]["reference" if v == "reference" else "dcube"]
            lines.append(f"| {v} | {r['median_images_per_s'][v]:.1f} | {min(s):.1f}-{max(s):.1f} | "
                         f"{r['ratio_to_reference'][v]:.2f} | {p:,} | {r['rounds']} x {r['steps_per_round']} | "
                         f"{r['threads']} | {r['load_avg_1min']} | {r['date']} |")
    for r in rows[-1:]:
        if "profile_dcube_eager" in r:
            lines.append("\nWhere dcube's eager fp32 step spends its time (torch.profiler, self CPU time, the latest row): "
                         + ", ".join(f"{g} {v:.0%}" for g, v in r["profile_dcube_eager"].items()) + ".")
    lines.append("\nParameters differ by the reference's bias-free qkv projections and its label embedding table "
                 "(dcube: a soft class embedding, which also takes class mixtures).")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, help="a checkout of github.com/baofff/U-ViT")
    p.add_argument("--rounds", type=int, default=2 if SMOKE else 6)
    p.add_argument("--steps", type=int, default=1 if SMOKE else 5)
    p.add_argument("--tag", default="run", help="the result's name (one JSON per tag)")
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    if not a.table_only and a.reference is None:
        p.error("--reference DIR is needed (a checkout of github.com/baofff/U-ViT; nothing is downloaded)")
    jobs = [(a.tag, lambda: measure(a.reference, a.rounds, a.steps))]
    return run_study(STUDY, jobs, table, a.table_only)


if __name__ == "__main__":
    sys.exit(main())
