"""Two sets of runs on the same test images: the paired difference of a metric, with the seeds' training noise
in its CI (``dcube compare``, ``dcube.compare_runs``). Any run whose ``metrics.json`` holds per-image test
probabilities and ids can take part: ``dcube run``'s, ``dcube train-baseline``'s and the latent zero-shot's
(``run_dir/latent/zeroshot/metrics.json``) alike (:func:`dcube.evaluate.record.evaluation_record`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dcube.evaluate.stats import METRICS, two_level_bootstrap
from dcube.utils.io import read_json


def _load(run: str | Path) -> dict:
    path = Path(run)
    path = path if path.suffix == ".json" else path / "metrics.json"  # a run directory, or a record itself
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.json; run 'dcube run' (or train-baseline) first")
    m = read_json(path)
    if "test_ids" not in m or "test_probs" not in m:
        raise ValueError(f"{path}: no per-image test record (made by an older dcube); run 'dcube evaluate' on it again")
    return {**m, "_path": str(path)}


def compare_runs(runs_a: Sequence[str | Path], runs_b: Sequence[str | Path], metric: str = "auc") -> dict:
    """mean over A's runs minus mean over B's runs of `metric` on their common test images (two-level bootstrap:
    images, then runs; A's and B's runs paired by position when both lists are equally long, e.g. by seed).
    ValueError naming the run whose test images differ from the first one's."""
    if metric not in METRICS:
        raise ValueError(f"metric: {metric!r} is not one of {list(METRICS)}")
    a, b = [_load(r) for r in runs_a], [_load(r) for r in runs_b]
    if not a or not b:
        raise ValueError("compare: needs at least one run on each side")
    ref = a[0]
    for m in a[1:] + b:
        if m["test_ids"] != ref["test_ids"]:
            raise ValueError(f"{m['_path']}: its test images are not those of {ref['_path']} (another split, caps or "
                             f"data); a paired comparison needs the same test images in the same order")
    y = np.asarray(ref["test_labels"])
    out = two_level_bootstrap(y, [np.asarray(m["test_probs"]) for m in a], [np.asarray(m["test_probs"]) for m in b],
                              metric, paired=len(a) == len(b))
    return {**out, "runs_a": [m["_path"] for m in a], "runs_b": [m["_path"] for m in b], "n_test": len(y)}
