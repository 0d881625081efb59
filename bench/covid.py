"""The paper's X-ray dataset: COVID-19 Radiography subset, one seeded stratified 8:2 split
(train/val carved from the 8: 70/10/20), D-Cube vs the baselines, next to the latent-diffusion
results of `bench.latent_covid` (same split).

    python -m bench.covid [--methods ...] [--seeds 0 1 2]   # resumable
    python -m bench.covid --table-only

CPU budget: pixel-space step 1 at 128 px costs ~31 s per batch of 32 on one core here (~43 min per
epoch), so D-Cube runs on the same split resized to 64 px (labelled in the table); the baselines
see 128 px. The split (data.split_seed = 0) is the same for every method and seed; each JSON
records a hash of the test ids.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from functools import partial
from pathlib import Path

from bench.baselines import run_baseline
from bench.common import (RESULTS, STATS, THREADS, ci_cell, load_results, machine, mean_std, paired_cell, run_study,
                          shared_data, shrink, smoke_epochs)

STUDY = "covid"
METHODS = ("resnet18", "dcube", "linear-probe", "efficientnet-lite0")
BASELINE_EPOCHS = {"resnet18": 8, "efficientnet-lite0": 4}
DCUBE_SIZE = 64
DCUBE = {"diffusion": {"backbone": "unet", "preset": "tiny", "epochs": 3, "batch_size": 32, "lr": 5e-4,
                       "checkpoint_every": 20},
         "classifier": {"epochs": 4, "batch_size": 64}}


def data_dict(size: int) -> dict:
    return {"source": "folder", "path": str(shared_data() / "covid_radiography_128"), "image_size": size,
            "val_fraction": 0.1, "test_fraction": 0.2, "split_seed": 0}


def _rel_ids(data) -> list[str]:
    """The test images' class-folder/file names, in split order (the paired tests pair images by position)."""
    return ["/".join(Path(i).parts[-2:]) for i in data.test.ids]


def split_hash(data) -> str:
    """Of the test images' relative paths: equal hashes = the same test split."""
    return hashlib.sha256("\n".join(sorted(_rel_ids(data))).encode()).hexdigest()[:16]


def dcube_run(seed: int) -> dict:
    from dcube.config import from_dict
    from dcube.pipeline import DCube, run

    cfg = from_dict(shrink({"run_dir": str(RESULTS / STUDY / "runs" / f"dcube{DCUBE_SIZE}-s{seed}"), "seed": seed,
                            "threads": THREADS, "data": data_dict(DCUBE_SIZE), **DCUBE}))
    out = run(cfg)
    data = DCube(cfg).data
    return {"study": STUDY, "method": "D-Cube", "method_id": "dcube", "seed": seed, "image_size": DCUBE_SIZE,
            "schedule": DCUBE, "data": data.info, "split_sha": split_hash(data), "test": out["test"],
            "test_ids": _rel_ids(data), "test_probs": out["test_probs"], "config": cfg.to_dict(),
            "data_config": cfg.to_dict()["data"],
            "val": out["val"], "best_epoch": out["best_epoch"], "layers": out["layers"],
            "stage_seconds": out["timings_s"]}


def baseline_run(method: str, seed: int) -> dict:
    from dcube.config import DataConfig
    from dcube.data import load_data

    run_dir = RESULTS / STUDY / "runs" / f"{method}-s{seed}"
    dc = shrink({"data": data_dict(128)})["data"]
    data = load_data(DataConfig(**dc), seed, run_dir)
    out = run_baseline(method, data, run_dir, seed, smoke_epochs(BASELINE_EPOCHS.get(method)), THREADS)
    return {"study": STUDY, "image_size": 128, "data": data.info, "split_sha": split_hash(data),
            "test_ids": _rel_ids(data), "data_config": dc, **out}


def _latent_rows() -> list[str]:
    """The latent-diffusion results of bench.latent_covid (one trained model, seed 0)."""
    res = {r["key"]: r for r in load_results("latent_covid")}

    def row(name: str, m: dict, note: str, date: str) -> str:
        return (f"| {name} | 1 (0) | 128 | {m['accuracy']:.3f} | {m['auc']:.3f} | - | - | - | {m['f1_macro']:.3f} | "
                f"{note}; `python -m bench.latent_covid` | {date} |")

    old = " (dcube 0.1's denoiser: contrastive pairs)"
    rows = []
    cc = res.get("11_denoiser_class_conditional")
    if cc:
        rows.append(row("latent diffusion, zero-shot (today's denoiser: class-conditional)", cc["metrics"],
                        "400-image stratified test subset", cc["date"]))
    for key, name, note in (("3_zeroshot_plain", "latent diffusion, zero-shot", "400-image stratified test subset"),
                            ("4_zeroshot_adaptive", "latent diffusion, zero-shot (adaptive)", "400-image subset")):
        if key in res:
            rows.append(row(name + old, res[key]["metrics"], note, res[key]["date"]))
    h = res.get("6_heads")
    if h:
        for k, name in (("linear_probe", "latent diffusion features, linear probe"), ("mlp_head", "latent diffusion features, MLP head")):
            rows.append(row(name + old, h[k], "full test split", h["date"]))
    f = res.get("9_finetune_head_lr1e-4") or res.get("7_finetune")
    if f:
        rows.append(row("latent diffusion, fine-tuned end to end" + old, f["test"], "full test split", f["date"]))
    return rows


def _schedule(r: dict) -> str:
    s = r["schedule"]
    if r["method_id"] == "dcube":
        return (f"step 1 {s['diffusion']['preset']} UNet {s['diffusion']['epochs']} epochs, step 2 "
                f"{s['classifier']['epochs']} epochs (shortened)")
    if "epochs" in s:
        return f"{s['epochs']} epochs, Adam {s['lr']:g}, batch {s['batch_size']}, LR x0.1 at 50/75%"
    return "C chosen on validation"


def table() -> str:
    rows = load_results(STUDY)
    splits = sorted({r["split_sha"] for r in rows})
    lines = ["## COVID-19 Radiography (the paper's X-ray dataset)\n",
             f"Command: `python -m bench.covid` (resumable). Machine: {machine()}. Split: seeded stratified "
             f"70/10/20 (`data.split_seed=0`, the 8:2 split with validation carved from the 8), the same for every "
             f"D-Cube and baseline row (test-split hash {', '.join(splits) or '-'}), positive class COVID. Best epoch / C on "
             "validation AUC. D-Cube runs at 64 px because pixel-space step 1 at 128 px does not fit this CPU "
             "(~43 min per epoch); the baselines see 128 px. Test AUC 95 % CI of the seed mean and "
             "the paired columns (D-Cube's seed-mean minus the row's on the same test images and seeds): "
             f"{STATS} (\"-\" for runs that did not store per-image probabilities). The latent rows come from `bench.latent_covid`: one "
             "model, one seed, on the split of its date (test 760 images), drawn before the loader kept duplicate "
             "images within one split (the rows above: test "
             f"{'/'.join(str(n) for n in sorted({sum(r['data']['class_counts']['test'].values()) for r in rows}))} "
             "images); they are compared with nothing.\n",
             "| model | seeds | px | test ACC | test AUC | test AUC 95 % CI | D-Cube minus this row: ΔAUC [95 % CI], p | "
             "ΔACC [95 % CI], p | macro-F1 | schedule | date |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = [m for m in ("D-Cube", "ResNet-18") if any(r["method"] == m for r in rows)]
    order += [r["method"] for r in rows if r["method"] not in order]
    dc = [r for r in rows if r["method"] == "D-Cube"]
    for method in dict.fromkeys(order):
        rs = [r for r in rows if r["method"] == method]
        vs = ["-", "-"] if method == "D-Cube" or not _pairable(dc, rs) else [
            paired_cell(dc, rs, m) for m in ("auc", "accuracy")]
        lines.append(f"| **{method}** (dcube) | {len(rs)} ({', '.join(str(r['seed']) for r in rs)}) | "
                     f"{rs[0]['image_size']} | {mean_std([r['test']['accuracy'] for r in rs])} | "
                     f"{mean_std([r['test']['auc'] for r in rs])} | {ci_cell(rs)} | {vs[0]} | {vs[1]} | "
                     f"{mean_std([r['test']['f1_macro'] for r in rs])} | {_schedule(rs[0])} | {rs[-1]['date']} |")
    lines += _latent_rows()
    return "\n".join(lines)


def _pairable(a: list[dict], b: list[dict]) -> bool:
    """Both sets of runs stored their test images in one and the same order, on the same seeds."""
    ids = [r.get("test_ids") for r in a + b]
    return bool(a) and all(i is not None and i == ids[0] for i in ids) and sorted(r["seed"] for r in a) == sorted(
        r["seed"] for r in b)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    jobs = ((f"{m}-s{seed}", partial(dcube_run, seed) if m == "dcube" else partial(baseline_run, m, seed))
            for seed in a.seeds for m in a.methods)
    return run_study(STUDY, jobs, table, a.table_only)


if __name__ == "__main__":
    sys.exit(main())
