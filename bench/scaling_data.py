"""Memory and time as the dataset grows (issue 15): the whole pipeline at N = 1k ... 50k images.

    python -m bench.scaling_data [--sizes 28] [--n 1000 5000 20000 50000] [--modes disk ram] [--table-only]

The data: every real PneumoniaMNIST image (5,856) and every COVID-19 Radiography image of
../shared/data (3,803; the Kermany folder is not in shared/data), replicated with small seeded
augmentations (shift up to 2/28 of the side, contrast and brightness within 5 %) into one folder of
50k PNGs at the study's size, in a seeded order; a CSV manifest of the first N files is dataset N
(the split is dcube's own: 70/10/20, stratified). Labels: normal vs abnormal (pneumonia, COVID).

Each (size, N, mode) runs `dcube.pipeline.run` in a fresh process: step 1 for a fixed number of
optimiser steps (`STEP1_STEPS`; its time is per step, not per epoch), KS selection, feature extraction
of every split, one step-2 epoch. `disk` is ``data.in_memory_mb: 0`` (splits decoded once into the
uint8 store, features written batch by batch, both read by rows); `ram` is ``in_memory_mb: null`` (the
splits as float32 tensors, as before this study). Peak RSS is the child's VmHWM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS, SMOKE, THREADS, machine, run_study, shared_data

STUDY = "scaling_data"
STEP1_STEPS = {28: 2, 128: 2} if SMOKE else {28: 100, 128: 200}
N_MAX = 120 if SMOKE else 50_000  # images in the built folder (the smoke test: a few PneumoniaMNIST ones)
# per image size: what differs from dcube's defaults. 128 px on one CPU thread (the micro UNet reads
# about 19 images/s there) keeps the 50k row to about an hour: step-1 batch 16; two 32x32 layers named
# (the KS choice could keep the 128x128 up_1, 512 KB per image in float16: 25 GB at 50k); no flipped
# features (flips, flip consistency) and no cycle loss, whose denoiser passes would double step 2.
SETTINGS = {
    28: {"diffusion": {"batch_size": 64}, "features": {},
         "classifier": {"subfeature": "none", "epochs": 1, "batch_size": 64}},
    128: {"diffusion": {"batch_size": 16}, "features": {"layers": ["down_1", "mid"]},
          "classifier": {"subfeature": "none", "epochs": 1, "batch_size": 64, "flip_augment": False,
                         "consistency_weight": 0.0, "cycle_weight": 0.0}},
}
WORK = Path(os.environ["DCUBE_BENCH_OUT"]) / "scaling-work" if SMOKE and os.environ.get("DCUBE_BENCH_OUT") \
    else Path("/tmp/dcube-scaling")


def _sources():
    """(uint8 image (H, W), label 0/1) of every real image: PneumoniaMNIST and COVID-19 Radiography."""
    import numpy as np
    from PIL import Image

    z = np.load(shared_data() / "medmnist" / "pneumoniamnist.npz")
    for s in ("train", "val", "test"):
        for img, y in zip(z[f"{s}_images"], z[f"{s}_labels"].reshape(-1)):
            yield img, int(y)
    root = shared_data() / "covid_radiography_128"
    for cls, y in (("Normal", 0), ("COVID", 1)):
        for p in sorted((root / cls).glob("*.png")):
            with Image.open(p) as im:
                yield np.asarray(im.convert("L")), y


def _of_each_label(k: int):
    """The first `k` source images of each label (the smoke test's few)."""
    seen = {0: 0, 1: 0}
    for a, y in _sources():
        if seen[y] < k:
            seen[y] += 1
            yield a, y
        if min(seen.values()) >= k:
            return


def build(size: int, n_max: int) -> Path:
    """WORK/s<size>/: n_max augmented PNGs and manifest-<N>.csv files (written once; reused)."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    d = WORK / f"s{size}"
    done = d / f"built-{n_max}"
    if done.exists():
        return d
    (d / "img").mkdir(parents=True, exist_ok=True)
    sources = _of_each_label(n_max) if SMOKE else _sources()
    base = [(np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)), y) for a, y in sources]
    g = np.random.default_rng(0)
    order = g.permutation(len(base))[:n_max] if SMOKE else g.permutation(n_max) % len(base)  # smoke: both labels
    rows = []
    for i, k in enumerate(tqdm(order, desc=f"building {n_max} images at {size} px")):
        a, y = base[k]
        shift = g.integers(-max(1, size // 14), max(1, size // 14) + 1, 2)
        x = np.roll(a.astype(np.float32), tuple(int(s) for s in shift), axis=(0, 1))
        x = x * g.uniform(0.95, 1.05) + g.uniform(-0.05, 0.05) * 255
        name = f"img/{i:06d}.png"
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(d / name)
        rows.append(f"{name},{'abnormal' if y else 'normal'}")
    for n in sorted({1000, 5000, 20000, 50000, n_max}):
        if n <= n_max:
            (d / f"manifest-{n}.csv").write_text("path,label\n" + "\n".join(rows[:n]) + "\n")
    done.write_text("ok\n")
    return d


_CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
from dcube.config import from_dict
from dcube.pipeline import run
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg.pop("_threads"))
t0 = time.time()
out = run(from_dict(cfg))
hwm = [int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:")][0]
print("RESULT " + json.dumps({"peak_rss_mb": round(hwm / 1024, 1), "wall_s": round(time.time() - t0, 1),
                              "stage_seconds": out["timings_s"], "test": out["test"], "layers": out["layers"]}))
"""


def measure(size: int, n: int, mode: str) -> dict:
    d = build(size, N_MAX)
    run_dir = WORK / "runs" / f"s{size}-n{n}-{mode}"
    if run_dir.exists():  # a fresh run each time: the times are of the work, not of a resume
        import shutil

        shutil.rmtree(run_dir)
    st = SETTINGS[size]
    cfg = {
        "run_dir": str(run_dir), "seed": 0, "threads": THREADS, "_threads": THREADS,
        "data": {"source": "csv", "path": str(d / f"manifest-{n}.csv"), "image_size": size,
                 "in_memory_mb": 0 if mode == "disk" else None},
        "diffusion": {"backbone": "unet", "preset": "micro", "max_steps": STEP1_STEPS[size],
                      "sample_grid": False, "checkpoint_every": 1000, **st["diffusion"]},
        "features": st["features"],
        "classifier": st["classifier"],
    }
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    res = json.loads([l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
    disk_mb = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) / 2 ** 20
    return {"study": STUDY, "size": size, "n": n, "mode": mode, "step1_steps": STEP1_STEPS[size], "settings": st, **res,
            "child_wall_s": round(time.time() - t0, 1), "run_dir_mb": round(disk_mb, 1), "threads": THREADS}


def table() -> str:
    from bench.common import load_results

    rows = sorted(load_results(STUDY), key=lambda r: (r["size"], r["mode"], r["n"]))
    lines = [f"## Memory and time as the dataset grows\n\nCommand: `python -m bench.scaling_data`. Machine: "
             f"{machine()}, {rows[0]['threads'] if rows else 1} torch thread. The whole pipeline in a fresh process "
             "per row: step 1 for a fixed number of optimiser steps (`unet` micro; its seconds are per run of "
             "steps, not per epoch), KS selection, features of every split, one step-2 epoch (no ImageNet "
             "CNN). *disk*: `data.in_memory_mb: 0` (uint8 image store, features written and read by rows); "
             "*ram*: `in_memory_mb: null` (float32 splits in RAM). Peak RSS = the process's VmHWM. N is split "
             "70/10/20. Settings per image size, as the runs stored them (the rest were dcube's defaults; why: "
             "`bench/scaling_data.py`, SETTINGS):\n\n" + "\n".join(
                 f"- {r['size']} px: step 1 {r['step1_steps']} steps; " + "; ".join(
                     f"{sec}.{k}={v}" for sec, kv in r["settings"].items() for k, v in kv.items())
                 for r in {r["size"]: r for r in rows}.values()) + "\n",
             "*classifier s*: the step-2 stage (its epoch and the train/val features); *evaluate s*: the rest after "
             "it (test features, metrics, report); *features s*: every split's extraction, inside those two; "
             "*s per 1k images*: everything but step 1 (whose steps are fixed), per 1,000 images.\n",
             "| size | mode | N | peak RSS MB | step 1 s | features s | classifier s | evaluate s | total s | "
             "s per 1k images (all but step 1) | run dir MB | test AUC | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st = r["stage_seconds"]
        total = st.get("total_this_call", r["wall_s"])
        rest = total - st.get("diffusion", 0) - st.get("select_layers", 0) - st.get("classifier", 0)
        lines.append(f"| {r['size']} | {r['mode']} | {r['n']} | {r['peak_rss_mb']:.0f} | {st.get('diffusion', 0):.0f} | "
                     f"{st.get('features', 0):.0f} | {st.get('classifier', 0):.0f} | {rest:.0f} | {total:.0f} | "
                     f"{(total - st.get('diffusion', 0)) / r['n'] * 1000:.1f} | "
                     f"{r['run_dir_mb']:.0f} | {r['test']['auc']:.3f} | {r['date']} |")
    for size in sorted({r["size"] for r in rows}):
        for mode in ("disk", "ram"):
            by = {r["n"]: r["peak_rss_mb"] for r in rows if r["size"] == size and r["mode"] == mode}
            if 5000 in by and 50000 in by:
                goal = " (the goal: within 1.20)" if mode == "disk" else ""
                lines.append(f"\n{size} px, {mode}: peak RSS at 50k / at 5k = {by[50000] / by[5000]:.2f}{goal}.")
            rs = [r for r in rows if r["size"] == size and r["mode"] == mode]
            if len(rs) >= 3:  # the exponent b of (all but step 1) = a N^b, least squares in log-log
                import numpy as np

                x = np.log([r["n"] for r in rs])
                y = np.log([r["stage_seconds"].get("total_this_call", r["wall_s"]) - r["stage_seconds"].get("diffusion", 0)
                            for r in rs])
                lines.append(f"\n{size} px, {mode}: time of all but step 1 grows as N^{np.polyfit(x, y, 1)[0]:.2f} "
                             f"over N = {min(r['n'] for r in rs)}-{max(r['n'] for r in rs)} (linear: 1.00).")
    lines.append("\n![peak RSS and time against N](bench/results/scaling_data/scaling.png)")
    _plot(rows)
    return "\n".join(lines)


def _plot(rows: list[dict]) -> None:
    if not rows:
        return
    from dcube.utils.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for size in sorted({r["size"] for r in rows}):
        for mode, style in (("disk", "o-"), ("ram", "s--")):
            rs = sorted((r for r in rows if r["size"] == size and r["mode"] == mode), key=lambda r: r["n"])
            if not rs:
                continue
            n = [r["n"] for r in rs]
            ax[0].plot(n, [r["peak_rss_mb"] for r in rs], style, label=f"{size} px, {mode}")
            ax[1].plot(n, [r["stage_seconds"].get("total_this_call", r["wall_s"]) - r["stage_seconds"].get("diffusion", 0)
                           for r in rs], style, label=f"{size} px, {mode}")
    ax[0].set(xlabel="images N", ylabel="peak RSS (MB)", title="peak memory", ylim=(0, None))
    ax[1].set(xlabel="images N", ylabel="seconds", title="all but step 1 (log-log: linear = slope 1)",
              xscale="log", yscale="log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for axis in (ax[1].xaxis, ax[1].yaxis):  # plain numbers: the literal-text style has no mathtext powers
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        axis.set_minor_formatter(NullFormatter())
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    out = RESULTS / STUDY / "scaling.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[28])
    p.add_argument("--n", nargs="+", type=int, default=[1000, 5000, 20000, 50000])
    p.add_argument("--modes", nargs="+", choices=["disk", "ram"], default=["disk", "ram"])
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    jobs = ((f"s{s}-n{n}-{m}", (lambda s=s, n=n, m=m: measure(s, n, m)))
            for s in a.sizes for n in a.n for m in a.modes)
    return run_study(STUDY, jobs, table, a.table_only)


if __name__ == "__main__":
    sys.exit(main())
