"""Write one evaluation to a run directory: metrics JSON + confusion-matrix and ROC PNGs.

Files (all written atomically):

* ``metrics.json`` for ``split="test"``, ``metrics_<split>.json`` for any other split
  (so a validation report never overwrites the test report);
* ``confusion_<split>.png`` and ``roc_<split>.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from dcube.evaluate.metrics import compute_metrics, validate_inputs
from dcube.evaluate.plots import plot_confusion, plot_roc
from dcube.utils.io import write_json


def metrics_filename(split: str) -> str:
    return "metrics.json" if split == "test" else f"metrics_{split}.json"


def write_report(run_dir: str | Path, metrics: Optional[dict], y_true: Any, probs: Any,
                 class_names: Sequence[str], split: str = "test") -> dict[str, Path]:
    """Write the report of one split into `run_dir`; returns ``{"metrics", "confusion", "roc"}`` paths.

    `metrics` is the output of :func:`compute_metrics` for the same `y_true`/`probs`
    (``None`` computes it). The JSON holds the metrics plus ``"split"``.
    """
    if not split or not str(split).replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"split: expected a short name such as 'test' or 'val', got {split!r}")
    y, p, names = validate_inputs(y_true, probs, class_names)
    if metrics is None:
        metrics = compute_metrics(y, p, names)
    elif metrics.get("n") != len(y) or list(metrics.get("class_names", [])) != names:
        raise ValueError(
            f"metrics: computed for n={metrics.get('n')} and classes {metrics.get('class_names')}, "
            f"but y_true/probs have n={len(y)} and classes {names}"
        )
    run_dir = Path(run_dir)
    paths = {
        "metrics": write_json(run_dir / metrics_filename(split), {"split": split, **metrics}),
        "confusion": plot_confusion(metrics, run_dir / f"confusion_{split}.png"),
        "roc": plot_roc(y, p, names, run_dir / f"roc_{split}.png"),
    }
    return paths
