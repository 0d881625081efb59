"""Calibrated probabilities and an operating point, both fitted on the VALIDATION split.

* :func:`fit_temperature` - temperature scaling (Guo et al. 2017): one scalar T minimising the
  validation negative log-likelihood of ``softmax(log p / T)`` (log-probabilities are logits up to a
  per-row constant, so this is exactly temperature scaling of the head's logits). It changes no
  decision: the arg-max and, for two classes, the 0.5 rule are invariant to T, and so are the AUCs.
* :func:`expected_calibration_error` - torchmetrics' top-label ECE (15 equal-width bins, L1).
* :func:`pick_threshold` - binary tasks: the largest threshold on the positive-class probability
  whose validation sensitivity reaches the target (``classifier.target_sensitivity``).
* :func:`operating_point` - sensitivity and specificity at a threshold with Wilson 95 % intervals.
* :func:`plot_reliability` - the reliability diagram, before and after.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import optimize, stats

N_BINS = 15


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1.0))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    z = _log(probs) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-_log(np.asarray(probs)[np.arange(len(y)), np.asarray(y)]).mean())


def fit_temperature(val_probs: np.ndarray, val_y: np.ndarray) -> float:
    """The T in [0.05, 20] minimising the validation NLL (bounded scalar search on log T)."""
    res = optimize.minimize_scalar(lambda lt: nll(apply_temperature(val_probs, np.exp(lt)), val_y),
                                   bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray) -> float:
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    p = torch.as_tensor(np.ascontiguousarray(probs), dtype=torch.float32)
    return float(multiclass_calibration_error(p, torch.as_tensor(np.asarray(y)), num_classes=p.shape[1],
                                              n_bins=N_BINS, norm="l1"))


def pick_threshold(val_p1: np.ndarray, val_y: np.ndarray, target: float) -> float:
    """The largest t with validation sensitivity P(p1 >= t | y = 1) >= target (class 1 positive)."""
    pos = np.sort(np.asarray(val_p1, dtype=np.float64)[np.asarray(val_y) == 1])
    if len(pos) == 0:
        raise ValueError("classifier.target_sensitivity: the validation split has no positive example")
    k = int(np.floor((1.0 - target) * len(pos) + 1e-9))  # positives that may fall below the threshold
    return float(pos[min(k, len(pos) - 1)])


def _wilson(k: int, n: int) -> list[float] | None:
    if n == 0:
        return None
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def operating_point(p1: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    """Sensitivity / specificity (class 1 positive) of ``p1 >= threshold``, with Wilson 95 % CIs."""
    y, dec = np.asarray(y), np.asarray(p1) >= threshold
    tp, fn = int((dec & (y == 1)).sum()), int((~dec & (y == 1)).sum())
    tn, fp = int((~dec & (y == 0)).sum()), int((dec & (y == 0)).sum())
    return {"threshold": float(threshold), "sensitivity": tp / max(tp + fn, 1), "sensitivity_ci95": _wilson(tp, tp + fn),
            "specificity": tn / max(tn + fp, 1), "specificity_ci95": _wilson(tn, tn + fp),
            "counts": {"tp": tp, "fn": fn, "tn": tn, "fp": fp}}


def calibrate(val_probs, val_y, test_probs, test_y, class_names, target_sensitivity: float | None = None) -> dict:
    """Temperature (fitted on validation), ECE and NLL before/after on both splits, and, for a binary task
    with a target sensitivity, the validation-chosen threshold and its test operating point."""
    vp, tp = np.asarray(val_probs, dtype=np.float64), np.asarray(test_probs, dtype=np.float64)
    vy, ty = np.asarray(val_y), np.asarray(test_y)
    t = fit_temperature(vp, vy)
    vc, tc = apply_temperature(vp, t), apply_temperature(tp, t)
    out = {"temperature": t, "fitted_on": "validation",
           "val": {"ece_before": expected_calibration_error(vp, vy), "ece_after": expected_calibration_error(vc, vy),
                   "nll_before": nll(vp, vy), "nll_after": nll(vc, vy)},
           "test": {"ece_before": expected_calibration_error(tp, ty), "ece_after": expected_calibration_error(tc, ty),
                    "nll_before": nll(tp, ty), "nll_after": nll(tc, ty)},
           "ece": f"top-label, {N_BINS} equal-width bins, L1 (torchmetrics)"}
    if target_sensitivity is not None:
        if len(class_names) != 2:
            raise ValueError("classifier.target_sensitivity: an operating point needs a binary task "
                             f"({len(class_names)} classes here)")
        thr = pick_threshold(vc[:, 1], vy, target_sensitivity)
        out["operating_point"] = {"target_sensitivity": target_sensitivity, "positive_class": class_names[1],
                                  "chosen_on": "validation (calibrated probabilities)",
                                  "val": operating_point(vc[:, 1], vy, thr), "test": operating_point(tc[:, 1], ty, thr)}
    return out


def calibration_warning(cal: dict) -> str | None:
    """A line for the user when the temperature fitted on validation made the TEST split worse calibrated
    (validation and test differ, e.g. PneumoniaMNIST's easier validation split); None otherwise."""
    t = cal.get("test") or {}
    before, after = t.get("ece_before"), t.get("ece_after")
    if before is None or after is None or after <= before:
        return None
    return (f"temperature scaling (fitted on validation) raised the test ECE ({before:.4f} -> {after:.4f}): "
            "this validation split is calibrated unlike the test split, so 'calibrated' means calibrated on "
            "validation; read reliability.png before trusting a probability")


def plot_reliability(probs_before, probs_after, y, path: str | Path, title: str = "test split") -> Path:
    """Reliability diagram (top-label confidence vs accuracy per bin), before and after scaling."""
    from dcube.evaluate.plots import _new_figure, _save

    fig = _new_figure(5.0, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    edges = np.linspace(0, 1, N_BINS + 1)
    y = np.asarray(y)
    for probs, label, color in ((probs_before, "before", "tab:gray"), (probs_after, "after temperature scaling",
                                                                       "tab:blue")):
        p = np.asarray(probs)
        conf, right = p.max(1), p.argmax(1) == y
        idx = np.clip(np.digitize(conf, edges) - 1, 0, N_BINS - 1)
        xs, ys = [], []
        for b in range(N_BINS):
            m = idx == b
            if m.any():
                xs.append(conf[m].mean())
                ys.append(right[m].mean())
        ax.plot(xs, ys, marker="o", color=color,
                label=f"{label} (ECE {expected_calibration_error(p, y):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="black", lw=0.8, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability, {title}")
    ax.legend(fontsize="small", loc="lower right")  # overconfident models leave that corner empty
    ax.grid(alpha=0.3)
    return _save(fig, path)
