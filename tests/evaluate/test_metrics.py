import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dcube.evaluate import (
    compute_metrics,
    format_table,
    plot_confusion,
    plot_curves,
    plot_roc,
    select_score,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _onehot(y, c, p=0.9):
    probs = np.full((len(y), c), (1 - p) / (c - 1))
    probs[np.arange(len(y)), y] = p
    return probs


def _random(n, c, seed=0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(c), rng.integers(0, c, n - c)])
    return y, rng.dirichlet(np.ones(c), size=n)


def test_perfect_classifier_scores_one():
    y = np.array([0, 1, 2, 2, 1, 0, 2])
    m = compute_metrics(y, _onehot(y, 3), ["a", "b", "c"])
    for k in ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "auc"):
        assert m[k] == 1.0, k
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 3]]
    assert {n: r["support"] for n, r in m["per_class"].items()} == {"a": 2, "b": 2, "c": 3}
    assert m["n"] == 7 and m["task"] == "multiclass" and m["note"] is None
    json.dumps(m)  # JSON-able as is


def test_known_confusion_matrix_by_hand():
    # true:  0 0 0 0 1 1 1 2 2 2 ; pred: 0 0 1 2 1 1 0 2 2 1
    y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 1])
    m = compute_metrics(y, _onehot(pred, 3, p=0.6), ["x", "y", "z"])
    assert m["confusion_matrix"] == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    assert m["accuracy"] == pytest.approx(6 / 10)
    rec = [2 / 4, 2 / 3, 2 / 3]
    prec = [2 / 3, 2 / 4, 2 / 3]
    f1 = [2 * p * r / (p + r) for p, r in zip(prec, rec)]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(rec))
    assert m["recall_macro"] == pytest.approx(np.mean(rec))
    assert m["precision_macro"] == pytest.approx(np.mean(prec))
    assert m["f1_macro"] == pytest.approx(np.mean(f1))
    for k, name in enumerate("xyz"):
        assert m["per_class"][name]["precision"] == pytest.approx(prec[k])
        assert m["per_class"][name]["recall"] == pytest.approx(rec[k])
        assert m["per_class"][name]["f1"] == pytest.approx(f1[k])


def test_binary_auc_uses_class1_score_and_threshold():
    y, p = _random(60, 2, seed=1)
    m = compute_metrics(y, p, ["normal", "pneumonia"])
    assert m["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert m["positive_class"] == "pneumonia" and m["task"] == "binary"
    assert m["accuracy"] == pytest.approx(np.mean((p[:, 1] > 0.5) == y))
    assert m["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))  # same rule for 2 classes
    # a 0.5/0.5 tie goes to class 0 under both rules
    tie = compute_metrics([0, 1], [[0.5, 0.5], [0.2, 0.8]], ["a", "b"])
    assert tie["confusion_matrix"] == [[1, 0], [0, 1]]


def test_multiclass_auc_is_ovr_macro():
    y, p = _random(80, 4, seed=2)
    m = compute_metrics(torch.tensor(y), torch.tensor(p, dtype=torch.float32), list("abcd"))
    ref = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert m["auc"] == pytest.approx(ref, abs=1e-6)
    assert "positive_class" not in m
    assert m["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))


def test_absent_class_gives_auc_none_with_note():
    y = np.array([0, 1, 0, 1, 0])
    _, p = _random(5, 3, seed=3)
    m = compute_metrics(y, p, ["a", "b", "c"])
    assert m["auc"] is None
    assert "['c']" in m["note"] and "no example" in m["note"]
    assert m["per_class"]["c"]["auc"] is None and m["per_class"]["a"]["auc"] is not None
    assert select_score(m, "auc") == m["balanced_accuracy"]
    json.dumps(m)


def test_select_score():
    y, p = _random(30, 2)
    m = compute_metrics(y, p, ["a", "b"])
    assert select_score(m, "auc") == m["auc"]
    assert select_score(m, "acc") == m["accuracy"]
    assert select_score(m, "f1") == m["f1_macro"]
    with pytest.raises(ValueError, match="select_metric"):
        select_score(m, "loss")


@pytest.mark.parametrize(
    "y, probs, names, match",
    [
        ([0, 1], [[np.nan, 1.0], [0.5, 0.5]], ["a", "b"], "probs"),
        ([0, 1], [[0.5, 0.5], [0.2, 0.8]], ["a", "b", "c"], "probs"),
        ([0, 1], [0.5, 0.5], ["a", "b"], "probs"),
        ([0, 1], [[2.0, -1.0], [0.2, 0.8]], ["a", "b"], "probs"),  # logits, not probabilities
        ([0, 1], [[0.3, 0.3], [0.2, 0.8]], ["a", "b"], "probs"),  # row does not sum to 1
        ([0, 2], [[0.5, 0.5], [0.2, 0.8]], ["a", "b"], "y_true"),
        ([0, -1], [[0.5, 0.5], [0.2, 0.8]], ["a", "b"], "y_true"),
        ([0, 1, 1], [[0.5, 0.5], [0.2, 0.8]], ["a", "b"], "y_true"),
        ([0, 0.5], [[0.5, 0.5], [0.2, 0.8]], ["a", "b"], "y_true"),
        ([0, 1], [[0.5, 0.5], [0.2, 0.8]], ["a", "a"], "class_names"),
    ],
)
def test_invalid_inputs_rejected(y, probs, names, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(np.array(y), np.array(probs), names)


def test_format_table_contains_numbers():
    y, p = _random(40, 3, seed=4)
    m = compute_metrics(y, p, ["normal", "benign", "malignant"])
    t = format_table(m, title="test")
    assert t.startswith("test")
    for v in (m["accuracy"], m["balanced_accuracy"], m["auc"], m["f1_macro"]):
        assert f"{v:.4f}" in t
    for name, r in m["per_class"].items():
        line = next(line for line in t.splitlines() if line.startswith(name))
        assert f"{r['recall']:.4f}" in line and str(r["support"]) in line
    m2 = compute_metrics([0, 0], [[0.7, 0.3], [0.4, 0.6]], ["a", "b"])
    assert "n/a" in format_table(m2) and "note:" in format_table(m2)


def test_plots_write_png(tmp_path):
    y, p = _random(30, 3, seed=5)
    names = ["a", "b", "c"]
    m = compute_metrics(y, p, names)
    paths = [
        plot_confusion(m, tmp_path / "cm.png"),
        plot_confusion(m, tmp_path / "cmn.png", normalize=True),
        plot_roc(y, p, names, tmp_path / "roc.png"),
        plot_roc(y[:2] * 0, p[:2], names, tmp_path / "roc_undefined.png"),
        plot_curves([{"epoch": 1, "train_loss": 1.0, "val_loss": 0.8, "val_auc": 0.6, "lr": 1e-3},
                     {"epoch": 2, "train_loss": 0.7, "val_loss": 0.7, "val_auc": None}],
                    tmp_path / "sub" / "curves.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert not [f for f in tmp_path.rglob("*") if f.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="history"):
        plot_curves([], tmp_path / "x.png")




def test_training_curves_put_dcube_losses_on_the_loss_panel():
    from dcube.evaluate.plots import _kind

    assert [_kind(k) for k in ("ce", "cycle", "consistency", "mse", "contrastive", "train_loss")] == ["loss"] * 6
    assert [_kind(k) for k in ("val_auc", "val_acc")] == ["metric"] * 2
    assert [_kind(k) for k in ("ema_decay", "cycle_grad_ratio", "cycle_loss_share")] == ["diagnostic"] * 3


def test_a_thousand_classes_stay_bounded(tmp_path):
    """1,000 classes: the confusion plot is a bounded top-confusions chart (not a 1,000 x 1,000 figure that
    needed GBs), the ROC shows the worst classes, the CIs skip only the macro AUC, the table stays short."""
    import tracemalloc

    import numpy as np
    from PIL import Image

    from dcube.evaluate import compute_metrics, format_table
    from dcube.evaluate.plots import plot_confusion, plot_roc
    from dcube.evaluate.stats import bootstrap_ci

    rng = np.random.default_rng(0)
    c = 1000
    y = np.repeat(np.arange(c), 2)
    p = rng.dirichlet(np.ones(c), len(y))
    p[np.arange(len(y)), y] += rng.uniform(0, 0.02, len(y))
    p /= p.sum(axis=1, keepdims=True)
    names = [f"class {i}" for i in range(c)]
    m = compute_metrics(y, p, names)
    m["ci95"] = bootstrap_ci(y, p, n_boot=200)
    assert "auc" not in m["ci95"] and "no AUC CI" in m["ci95"]["auc_note"]
    assert 0 <= m["ci95"]["f1_macro"][0] <= m["ci95"]["f1_macro"][1] <= 1
    assert len(format_table(m).splitlines()) < 40
    tracemalloc.start()
    plot_confusion(m, tmp_path / "cm.png")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200 * 2 ** 20, peak
    w, h = Image.open(tmp_path / "cm.png").size
    assert w < 1500 and h < 1500, (w, h)
    plot_roc(y, p, names, tmp_path / "roc.png")
    assert Image.open(tmp_path / "roc.png").size[0] < 1500
