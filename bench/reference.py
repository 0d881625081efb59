"""A refactor changes no number: the same small D-Cube run on this work tree and on an earlier commit.

    python -m bench.reference --against pre-1.0-variants      # resumable; one JSON per commit pair

Both runs use the defaults on a PneumoniaMNIST slice (micro preset, a few steps, one thread) in fresh
processes; the table shows whether the test metrics and every test probability are the same. The
earlier commit runs from a temporary `git worktree` of it (its own code, this machine's packages).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, SMOKE, load_results, machine, run_study, shared_data

STUDY = "reference"


def config(run_dir: Path) -> dict:
    return {"run_dir": str(run_dir), "seed": 0, "threads": 1,
            "data": {"name": "pneumoniamnist", "path": str(shared_data() / "medmnist" / "pneumoniamnist.npz"),
                     "download": False, "max_train": 64 if SMOKE else 160, "max_val": 32 if SMOKE else 64,
                     "max_test": 32 if SMOKE else 96},
            "diffusion": {"preset": "micro", "max_steps": 2 if SMOKE else 8, "batch_size": 16, "sample_grid": False},
            "classifier": {"epochs": 1 if SMOKE else 2, "batch_size": 16}}


def run_at(src: Path, run_dir: Path) -> dict:
    """`dcube run` of config() with the package at `src` (a checkout's src/), in a fresh process."""
    import yaml

    cfg = run_dir.parent / f"{run_dir.name}.yaml"
    cfg.write_text(yaml.safe_dump(config(run_dir)))
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dcube.cli", "run", str(cfg)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"dcube run at {src} failed: {proc.stderr[-2000:]}")
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"test": {k: m["test"][k] for k in ("auc", "accuracy", "f1_macro")}, "test_probs": m["test_probs"],
            "layers": m.get("layers")}


def compare(rev: str) -> dict:
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "old"), commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            before = run_at(tmp / "old" / "src", tmp / "before")
            after = run_at(ROOT / "src", tmp / "after")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "old")], cwd=ROOT, capture_output=True)
    diff = max(abs(a - b) for pa, pb in zip(before["test_probs"], after["test_probs"]) for a, b in zip(pa, pb))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip())
    return {"against": rev, "commit": commit, "after_commit": head + ("+changes" if dirty else ""),
            "before": before, "after": after,
            "same_layers": before["layers"] == after["layers"], "max_prob_diff": diff,
            "same_metrics": before["test"] == after["test"]}


def table() -> str:
    lines = ["## A refactor changes no number\n",
             f"Command: `python -m bench.reference --against REV`. Machine: {machine()}. The same small D-Cube run "
             "(defaults; PneumoniaMNIST slice, micro preset) on the earlier commit and on the work tree that made "
             "this page, each in a fresh process.\n",
             "| against | commit | work tree at | test AUC before | test AUC after | same metrics | same layers | "
             "largest test-probability difference |",
             "|---|---|---|---|---|---|---|---|"]
    for r in load_results(STUDY):
        lines.append(f"| `{r['against']}` | {r['commit'][:10]} | {r.get('after_commit', '-')[:10]} | "
                     f"{r['before']['test']['auc']:.4f} | "
                     f"{r['after']['test']['auc']:.4f} | {'yes' if r['same_metrics'] else 'NO'} | "
                     f"{'yes' if r['same_layers'] else 'NO'} | {r['max_prob_diff']:.2g} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", default="pre-1.0-variants", help="the earlier commit (a tag, branch or hash)")
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    key = a.against.replace("/", "_")
    return run_study(STUDY, [(key, lambda: compare(a.against))], table, a.table_only)


if __name__ == "__main__":
    sys.exit(main())
