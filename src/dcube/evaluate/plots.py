"""PNG figures: confusion matrix, ROC curves, training curves.

Figures are drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas directly (no
pyplot state, no GUI backend, safe in headless and multi-threaded runs), rendered to
memory and written atomically (temporary file + ``os.replace``) via
:func:`dcube.utils.io.atomic_write_bytes`. The plotting itself is scikit-learn's
:class:`~sklearn.metrics.ConfusionMatrixDisplay` and :class:`~sklearn.metrics.RocCurveDisplay`.
"""

from __future__ import annotations

import io
import math
import numbers
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator, NullFormatter
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from dcube.evaluate.metrics import validate_inputs
from dcube.utils.io import atomic_write_bytes
from dcube.utils.plotting import literal_text

DPI = 120

# history keys that are bookkeeping, not curves
_SKIP_KEYS = {"epoch", "step", "steps", "global_step", "lr", "cnn_lr", "time", "elapsed",
              "seconds", "wall_s", "best", "n", "num_classes"}


def _new_figure(w: float, h: float) -> Figure:
    literal_text()  # class names drawn as written ('$' is not mathtext)
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _rotate(names: Sequence[str]) -> Any:
    return 45 if len(names) > 4 or max(len(n) for n in names) > 8 else "horizontal"


def plot_confusion(metrics: dict, path: str | Path, normalize: bool = False) -> Path:
    """Confusion matrix of `metrics` (rows = true class) as a PNG; returns the path.

    ``normalize=True`` shows each row as fractions of the true class (per-class recall on
    the diagonal) instead of counts.
    """
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.float64)
    names = list(metrics["class_names"])
    if cm.shape != (len(names), len(names)):
        raise ValueError(f"metrics: confusion_matrix shape {cm.shape} does not match {len(names)} classes")
    if len(names) > MAX_MATRIX_CLASSES:
        return _plot_top_confusions(cm, names, path)
    fmt = "d"
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        cm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        fmt = ".2f"
    else:
        cm = cm.astype(np.int64)
    size = max(4.0, 0.6 * len(names) + 2.5)
    fig = _new_figure(size + 1.0, size)
    ax = fig.add_subplot(1, 1, 1)
    disp = ConfusionMatrixDisplay(confusion_matrix=cm, display_labels=names)
    disp.plot(ax=ax, cmap="Blues", values_format=fmt, xticks_rotation=_rotate(names), colorbar=True)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    title = "Confusion matrix" + (" (row-normalised)" if normalize else "")
    ax.set_title(f"{title}, n={int(np.asarray(metrics['confusion_matrix']).sum())}")
    return _save(fig, path)


MAX_MATRIX_CLASSES = 30  # more classes: the most frequent confusions as bars instead of a C x C matrix
TOP_CONFUSIONS = 20
MAX_ROC_CURVES = 10  # more classes: the curves of the classes with the lowest one-vs-rest AUC


def _plot_top_confusions(cm: np.ndarray, names: list, path) -> Path:
    """The TOP_CONFUSIONS largest off-diagonal counts (true -> predicted) as bars: a bounded figure at any
    number of classes."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None, kind="stable")[::-1][:TOP_CONFUSIONS]
    pairs = [(int(i // len(names)), int(i % len(names))) for i in flat if off.flat[i] > 0]
    fig = _new_figure(7.0, max(2.5, 0.3 * len(pairs) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(len(pairs)), [off[i, j] for i, j in pairs], color="tab:blue")
    ax.set_yticks(range(len(pairs)), [f"{names[i]} -> {names[j]}"[:40] for i, j in pairs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("test images")
    if not pairs:
        ax.text(0.5, 0.5, "no test image was misclassified", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{len(names)} classes: the {len(pairs)} most frequent confusions (true -> predicted); "
                 f"accuracy {np.trace(cm) / max(cm.sum(), 1):.3f}, n={int(cm.sum())}", fontsize=9)
    return _save(fig, path)


def plot_roc(y_true: Any, probs: Any, class_names: Sequence[str], path: str | Path,
             title: Optional[str] = None) -> Path:
    """ROC curve(s) as a PNG; returns the path.

    Binary: one curve for the class-1 score (class 1 positive, as in the metrics).
    Multi-class: one one-vs-rest curve per class. A class absent from `y_true` has no
    curve (its ROC is undefined) and is listed in the title.
    """
    y, p, names = validate_inputs(y_true, probs, class_names)
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    present = set(np.unique(y).tolist())
    absent = [n for k, n in enumerate(names) if k not in present]
    targets = [1] if len(names) == 2 else list(range(len(names)))
    shown = ""
    if len(targets) > MAX_ROC_CURVES:  # the worst classes: what a reader of a many-class ROC looks for
        from dcube.evaluate.stats import auc_of

        auc = {k: auc_of(y == k, p[:, k]) for k in targets if 0 < (y == k).sum() < len(y)}
        targets = sorted(auc, key=auc.get)[:MAX_ROC_CURVES]
        shown = f"\nthe {len(targets)} lowest of {len(names)} classes"
    drawn = 0
    for k in targets:
        pos = (y == k).astype(np.int64)
        if pos.all() or not pos.any():
            continue
        RocCurveDisplay.from_predictions(
            pos, p[:, k], pos_label=1, name=names[k], ax=ax,
            plot_chance_level=(drawn == 0),
        )
        drawn += 1
    if drawn == 0:
        ax.text(0.5, 0.5, "ROC undefined:\nonly one class present in y_true",
                ha="center", va="center", transform=ax.transAxes)
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    head = title or ("ROC (positive class: %s)" % names[1] if len(names) == 2 else "ROC, one-vs-rest")
    head += shown
    if absent:
        head += f"\nno examples of: {', '.join(absent[:5])}" + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
    ax.set_title(head)
    if drawn:
        ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def _scalars(entry: dict) -> dict[str, float]:
    """Numeric values of one history entry; one nested level is flattened (``val`` -> ``val_auc``)."""
    out: dict[str, float] = {}
    for k, v in entry.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                if k2 in _SKIP_KEYS or isinstance(v2, bool):
                    continue
                if isinstance(v2, numbers.Real) or v2 is None:
                    out[f"{k}_{k2}"] = math.nan if v2 is None else float(v2)
        elif isinstance(v, bool):
            continue
        elif isinstance(v, numbers.Real) or v is None:
            out[k] = math.nan if v is None else float(v)
    return out


#: dcube's loss terms, whose history keys carry no "loss" (step 2: ce, cycle, consistency; step 1: mse, contrastive)
LOSS_TERMS = {"ce", "cycle", "consistency", "mse", "contrastive"}


def _kind(key: str) -> str:
    if key in LOSS_TERMS or (key.endswith("loss") and "share" not in key):
        return "loss"
    if key.startswith(("val_", "train_acc", "train_auc", "test_")):
        return "metric"
    return "diagnostic"  # e.g. ema_decay, cycle_grad_ratio, cycle_loss_share


def plot_curves(history: list[dict], path: str | Path, title: Optional[str] = None) -> Path:
    """Training curves, one point per epoch, as a PNG; returns the path.

    Left panel: the loss terms (``ce``, ``cycle``, ``consistency``, ``mse``, ``contrastive`` and keys
    ending in ``loss``). Middle panel: the validation metrics (``val_*``). Right panel, when any:
    the other numeric keys (diagnostics such as ``ema_decay`` or ``cycle_grad_ratio``, on a log
    scale), apart from bookkeeping keys (epoch, step, lr, time...). The x axis is
    ``entry["epoch"]`` when present, else 1, 2, ... ``None`` values leave gaps.
    """
    if not history:
        raise ValueError("history: empty, nothing to plot")
    rows = [_scalars(h) for h in history]
    xs = [float(h["epoch"]) if isinstance(h.get("epoch"), numbers.Real) else float(i + 1)
          for i, h in enumerate(history)]
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and k not in _SKIP_KEYS]
    groups = [([k for k in keys if _kind(k) == "loss"], "loss"), ([k for k in keys if _kind(k) == "metric"], "metric")]
    diagnostics = [k for k in keys if _kind(k) == "diagnostic"]
    if diagnostics:
        groups.append((diagnostics, "diagnostic (log scale)"))

    fig = _new_figure(5.5 * len(groups), 4.2)
    for i, (group, label) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for k in group:
            ys = [r.get(k, math.nan) for r in rows]
            ax.plot(xs, ys, marker="o", markersize=3, label=k)
        if label.startswith("diagnostic") and any(r.get(k, 0) > 0 for r in rows for k in group):
            ax.set_yscale("log")
            # plain-text tick labels: text is drawn literally (dcube.utils.plotting), and the default log
            # formatter writes mathtext ($\\mathdefault{10^{-2}}$)
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if group:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {label} values", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
