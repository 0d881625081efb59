"""Classification metrics as one JSON-able dict (scikit-learn does the arithmetic).

Conventions (MedMNIST-compatible):

* **Decisions.** Multi-class: the arg-max class. Binary: class 1 when its probability is
  ``> 0.5`` (MedMNIST's ACC rule). For rows that sum to 1 this is identical to the arg-max,
  ties (0.5/0.5) included, which go to class 0 under both rules.
* **ROC-AUC.** Binary: the AUC of the class-1 probability, class 1 (``class_names[1]``)
  being the positive class, recorded as ``"positive_class"``. Multi-class: the unweighted
  mean of the one-vs-rest AUCs of every class (= scikit-learn ``multi_class="ovr",
  average="macro"``). When a class has no example in ``y_true`` the AUC is undefined:
  ``"auc"`` is ``None`` and ``"note"`` says why.
* **Precision/recall/F1.** Computed over every class in ``class_names``; a 0/0 ratio (a
  class never predicted, or absent) counts as 0 (scikit-learn ``zero_division=0``), so the
  macro means are never flattered by skipping classes.
* The confusion matrix has rows = true class, columns = predicted class, in
  ``class_names`` order.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

#: tolerance on the row sums of ``probs`` (float16/float32 softmax outputs)
ROW_SUM_TOL = 1e-3

SELECT_METRICS = ("auc", "acc", "f1")


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def validate_inputs(y_true: Any, probs: Any, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Check and convert the inputs; returns ``(y int64 (N,), probs float64 (N, C), names)``.

    Raises ValueError naming ``y_true``, ``probs`` or ``class_names`` on any problem.
    """
    names = [str(c) for c in class_names]
    if len(names) < 2:
        raise ValueError(f"class_names: need at least 2 classes, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names: duplicate names in {names!r}")
    c = len(names)

    p = _to_numpy(probs)
    if p.dtype == object or not np.issubdtype(p.dtype, np.number):
        raise ValueError(f"probs: expected a numeric array, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if p.ndim != 2 or p.shape[1] != c:
        raise ValueError(
            f"probs: expected shape (N, {c}) for {c} classes {names}, got {tuple(p.shape)}"
        )
    if p.shape[0] == 0:
        raise ValueError("probs: no rows (N = 0)")
    bad = ~np.isfinite(p).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"probs: {len(rows)} row(s) contain NaN or inf (first rows: {rows[:5].tolist()})"
        )
    if (p < -ROW_SUM_TOL).any() or (p > 1 + ROW_SUM_TOL).any():
        raise ValueError("probs: values must be probabilities in [0, 1] (apply softmax to logits first)")
    sums = p.sum(axis=1)
    off = np.abs(sums - 1.0) > ROW_SUM_TOL
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"probs: rows must sum to 1 (row {i} sums to {sums[i]:.6g}); apply softmax to logits first"
        )

    y = _to_numpy(y_true)
    if y.ndim == 2 and y.shape[1] == 1:  # MedMNIST stores labels as (N, 1)
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y_true: expected shape (N,), got {tuple(y.shape)}")
    if len(y) != len(p):
        raise ValueError(f"y_true: {len(y)} labels but probs has {len(p)} rows")
    if y.dtype == bool or not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"y_true: expected integer class ids, got dtype {y.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise ValueError("y_true: expected integer class ids, got non-integer values")
    y = y.astype(np.int64)
    out = (y < 0) | (y >= c)
    if out.any():
        raise ValueError(
            f"y_true: labels must lie in [0, {c - 1}] for {c} classes, "
            f"got {sorted(set(y[out].tolist()))[:5]}"
        )
    return y, p, names


def predicted_labels(probs: np.ndarray) -> np.ndarray:
    """Decisions: class-1 probability > 0.5 for two classes, arg-max otherwise."""
    if probs.shape[1] == 2:
        return (probs[:, 1] > 0.5).astype(np.int64)
    return probs.argmax(axis=1).astype(np.int64)


def _f(x: Any) -> Optional[float]:
    x = float(x)
    return None if math.isnan(x) else x


def compute_metrics(y_true: Any, probs: Any, class_names: Sequence[str]) -> dict:
    """All metrics of one evaluation, as plain Python floats/ints/lists (JSON-able).

    Args:
        y_true: (N,) integer class ids (numpy, list or torch).
        probs: (N, C) class probabilities, C == len(class_names), rows summing to 1.
        class_names: the class names, index i naming class id i.

    Returns a dict with ``n``, ``num_classes``, ``class_names``, ``task``
    (``"binary"``/``"multiclass"``), ``decision_rule``, ``accuracy``, ``balanced_accuracy``,
    ``precision_macro``, ``recall_macro``, ``f1_macro``, ``auc`` (float or None),
    ``auc_method``, ``positive_class`` (binary only), ``per_class`` ({name: {precision,
    recall, f1, support, auc}}), ``confusion_matrix`` (rows = true), ``note`` (str or None).
    """
    y, p, names = validate_inputs(y_true, probs, class_names)
    c = len(names)
    labels = list(range(c))
    pred = predicted_labels(p)
    notes: list[str] = []

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on absent classes; handled below
        acc = accuracy_score(y, pred)
        bacc = balanced_accuracy_score(y, pred)
        prec, rec, f1, support = precision_recall_fscore_support(
            y, pred, labels=labels, average=None, zero_division=0
        )
        mprec, mrec, mf1, _ = precision_recall_fscore_support(
            y, pred, labels=labels, average="macro", zero_division=0
        )
    cm = confusion_matrix(y, pred, labels=labels)

    # one-vs-rest AUC per class (binary: class-1 score for the overall AUC, as MedMNIST)
    present = set(np.unique(y).tolist())
    absent = [names[k] for k in labels if k not in present]
    per_auc: list[Optional[float]] = []
    for k in labels:
        pos = y == k
        if pos.all() or not pos.any():
            per_auc.append(None)
        else:
            per_auc.append(_f(roc_auc_score(pos.astype(np.int64), p[:, k])))
    if absent:
        auc = None
        notes.append(
            f"ROC-AUC undefined: class(es) {absent} have no example in y_true "
            f"(balanced accuracy is used instead where a score is needed)"
        )
    elif c == 2:
        auc = _f(roc_auc_score(y, p[:, 1]))
    else:
        auc = _f(np.mean(per_auc))

    out: dict[str, Any] = {
        "n": int(len(y)),
        "num_classes": c,
        "class_names": names,
        "task": "binary" if c == 2 else "multiclass",
        "decision_rule": (
            "class-1 probability > 0.5 (identical to argmax for two classes)"
            if c == 2
            else "argmax"
        ),
        "accuracy": float(acc),
        "balanced_accuracy": float(bacc),
        "precision_macro": float(mprec),
        "recall_macro": float(mrec),
        "f1_macro": float(mf1),
        "auc": auc,
        "auc_method": (
            f"ROC-AUC of the class-1 score (positive class {names[1]!r})"
            if c == 2
            else "one-vs-rest, unweighted mean over classes"
        ),
    }
    if c == 2:
        out["positive_class"] = names[1]
    out["per_class"] = {
        names[k]: {
            "precision": float(prec[k]),
            "recall": float(rec[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
            "auc": per_auc[k],
        }
        for k in labels
    }
    out["confusion_matrix"] = cm.astype(int).tolist()
    out["confusion_matrix_axes"] = "rows = true class, columns = predicted class (class_names order)"
    out["note"] = "; ".join(notes) if notes else None
    return out


def select_score(metrics: dict, name: str) -> float:
    """The validation score used to choose the best epoch (higher is better).

    ``"auc"`` -> ROC-AUC, falling back to balanced accuracy when the AUC is undefined
    (``None``, a class absent from the validation set); ``"acc"`` -> accuracy;
    ``"f1"`` -> macro F1.
    """
    if name == "auc":
        auc = metrics.get("auc")
        return float(metrics["balanced_accuracy"] if auc is None else auc)
    if name == "acc":
        return float(metrics["accuracy"])
    if name == "f1":
        return float(metrics["f1_macro"])
    raise ValueError(f"select_metric: {name!r} is not one of {list(SELECT_METRICS)}")


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


MAX_PRINTED_CLASSES = 30  # more classes: format_table prints the overall metrics only


def format_table(metrics: dict, title: Optional[str] = None) -> str:
    """A plain-text table of `metrics` (from :func:`compute_metrics`) for the terminal."""
    lines: list[str] = []
    head = title if title else "metrics"
    lines.append(f"{head} (n={metrics['n']}, {metrics['num_classes']} classes)")
    auc_label = "ROC-AUC"
    if metrics.get("positive_class") is not None:
        auc_label += f" (positive: {metrics['positive_class']})"
    else:
        auc_label += " (one-vs-rest macro)"
    overall = [
        ("accuracy", "accuracy"),
        ("balanced accuracy", "balanced_accuracy"),
        (auc_label, "auc"),
        ("precision (macro)", "precision_macro"),
        ("recall (macro)", "recall_macro"),
        ("F1 (macro)", "f1_macro"),
    ]
    ci = metrics.get("ci95") or {}
    w = max(len(k) for k, _ in overall)
    lines.append("-" * (w + 12) + (f"   {ci.get('level', 0.95):.0%} CI (bootstrap)"
                                   if any(key in ci for _, key in overall) else ""))
    for k, key in overall:
        extra = f"   [{ci[key][0]:.4f}, {ci[key][1]:.4f}]" if key in ci else ""
        lines.append(f"{k:<{w}}  {_fmt(metrics[key]):>8}{extra}")

    names = list(metrics["per_class"])
    if len(names) > MAX_PRINTED_CLASSES:  # the per-class numbers and the matrix are in metrics.json
        lines.append(f"\n({len(names)} classes: the per-class table and the confusion matrix are in metrics.json)")
        return "\n".join(lines + ([f"\nnote: {metrics['note']}"] if metrics.get("note") else []))
    cw = max(5, max(len(n) for n in names))
    cols = ("precision", "recall", "F1", "AUC", "support")
    lines.append("")
    lines.append(f"{'class':<{cw}}  " + "  ".join(f"{c:>9}" for c in cols))
    lines.append("-" * (cw + 2 + 11 * len(cols)))
    for n in names:
        r = metrics["per_class"][n]
        vals = (r["precision"], r["recall"], r["f1"], r["auc"], r["support"])
        lines.append(f"{n:<{cw}}  " + "  ".join(f"{_fmt(v):>9}" for v in vals))

    cm = metrics.get("confusion_matrix")
    if cm:
        vw = max(6, max(len(str(v)) for row in cm for v in row))
        idx = [str(i) for i in range(len(names))]
        lines.append("")
        lines.append("confusion matrix (rows = true, columns = predicted)")
        lines.append(f"{'':<{cw}}  " + " ".join(f"{i:>{vw}}" for i in idx))
        for i, (n, row) in enumerate(zip(names, cm)):
            label = f"{n}"
            lines.append(f"{label:<{cw}}  " + " ".join(f"{v:>{vw}}" for v in row) + f"   [{i}]")
    if metrics.get("note"):
        lines.append("")
        lines.append(f"note: {metrics['note']}")
    return "\n".join(lines)
