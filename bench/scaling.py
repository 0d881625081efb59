"""Step-1 training throughput with 1 and N processes (torch.distributed through Accelerate).

    python -m bench.scaling [--procs 1 2] [--amp no bf16] [--images 200] [--threads 1]
    python -m bench.scaling --table-only

Each measurement is a fresh launch of the real trainer (:func:`dcube.diffusion.trainer.train_diffusion`):
one process is ``python -m bench.scaling --child ...``, N processes the same under
``torchrun --nproc_per_node N`` (gloo on the CPU). The batch (``--batch``) is the global batch, dealt
out to the processes, so every configuration runs the same optimiser steps; images/s counts the
images of the timed steps (after one warm-up step) per wall-clock second of rank 0, between barriers.
Random images (the speed does not depend on their content). On a CPU the processes share the
machine's cores with each other and with whatever else runs: the table records the load average.
GPU numbers are not measured here (no GPU was available); the same command runs there.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial

from bench.common import SMOKE, load_results, machine, run_study

STUDY = "scaling"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(a) -> None:
    """One measurement, in every launched process; rank 0 writes the result to ``a.out``."""
    import torch

    torch.set_num_threads(a.threads)
    from dcube.config import ComputeConfig, DiffusionConfig
    from dcube.diffusion.trainer import train_diffusion
    from dcube.utils import dist

    steps = max(1, a.images // a.batch)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((steps + 1) * a.batch, 1, a.size, a.size, generator=g) * 2 - 1
    y = torch.arange(len(x)) % 2
    compute = ComputeConfig(mixed_precision=a.amp_mode)
    with tempfile.TemporaryDirectory() as d:
        d = dist.gather_objects([d])[0]  # rank 0's folder for everybody (only rank 0 writes)
        cfg = DiffusionConfig(backbone=a.backbone, preset=a.preset, batch_size=a.batch, max_steps=1,
                              sample_grid=False, checkpoint_every=10 ** 6)
        train_diffusion(cfg, x, y, 2, d, compute=compute)  # warm-up step (allocations, first checkpoint)
        cfg.max_steps = steps + 1
        dist.barrier()
        t0 = time.perf_counter()
        train_diffusion(cfg, x, y, 2, d, compute=compute)
        dist.barrier()
        dt = time.perf_counter() - t0
    if dist.is_main():
        with open(a.out, "w") as f:
            json.dump({"processes": dist.world_size(), "threads_per_process": a.threads, "amp": a.amp_mode,
                       "backbone": a.backbone, "preset": a.preset, "size": a.size, "batch": a.batch,
                       "images": steps * a.batch, "seconds": dt, "images_per_s": steps * a.batch / dt}, f)


def measure(procs: int, amp: str, a) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        args = ["--child", "--amp-mode", amp, "--out", out, "--images", str(a.images), "--batch", str(a.batch),
                "--threads", str(a.threads), "--backbone", a.backbone, "--preset", a.preset, "--size", str(a.size)]
        if procs == 1:
            cmd = [sys.executable, "-m", "bench.scaling", *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "bench.scaling", *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        load = round(os.getloadavg()[0], 2)
        subprocess.run(cmd, env=env, check=True)
        with open(out) as f:
            return {**json.load(f), "load_avg_1min": load}


def table() -> str:
    res = sorted(load_results(STUDY), key=lambda r: (r["backbone"], r["size"], r["amp"], r["processes"]))
    lines = ["## Scaling: step-1 training on several processes\n",
             "Command: `python -m bench.scaling` (options `--procs`, `--amp`, `--images`, `--threads`). "
             f"Machine: {machine()}. Processes talk through torch.distributed (gloo on the CPU), launched by "
             "`torchrun`; the global batch is dealt out to them, so each configuration runs the same optimiser "
             "steps. `load` is the 1-minute load average when the measurement started (other jobs shared "
             "the CPU when it is above ~1). **GPU numbers are not measured** (no GPU was available); "
             "`accelerate launch --num_processes N -m dcube.cli run cfg.yaml` is the GPU command.\n",
             "| model | px | batch | mixed precision | processes x threads | images/s | speed-up | load | date |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["backbone"], r["preset"], r["size"], r["amp"], r["threads_per_process"]): r["images_per_s"]
            for r in res if r["processes"] == 1}
    for r in res:
        one = base.get((r["backbone"], r["preset"], r["size"], r["amp"], r["threads_per_process"]))
        speed = f"{r['images_per_s'] / one:.2f}x" if one else "-"
        lines.append(f"| {r['backbone']} `{r['preset']}` | {r['size']} | {r['batch']} | {r['amp']} | "
                     f"{r['processes']} x {r['threads_per_process']} | {r['images_per_s']:.1f} | {speed} | "
                     f"{r['load_avg_1min']} | {r['date']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    p.add_argument("--amp", nargs="+", choices=["no", "bf16", "fp16"], default=["no"],
                   help="mixed-precision modes to measure (compute.mixed_precision)")
    p.add_argument("--images", type=int, default=64 if SMOKE else 200, help="timed images per measurement")
    p.add_argument("--batch", type=int, default=16 if SMOKE else 32)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--backbone", default="unet")
    p.add_argument("--preset", default="micro" if SMOKE else "tiny")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--amp-mode", default="no", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return 0
    jobs = ((f"step1-{a.backbone}-{a.preset}-{a.size}px-b{a.batch}-{amp}-p{procs}x{a.threads}",
             partial(measure, procs, amp, a)) for amp in a.amp for procs in a.procs)
    return run_study(STUDY, jobs, table, a.table_only)


if __name__ == "__main__":
    sys.exit(main())
