"""Bootstrap CIs and paired tests (dcube.evaluate.stats): agreement with the metrics module,
nominal coverage on a simulated case, power against a known difference and calibration under the null."""

import numpy as np
import pytest
from scipy import stats as sps

from dcube.evaluate import compute_metrics
from dcube.evaluate.stats import bootstrap_ci, delong_test, mcnemar_test, metric_rows, paired_bootstrap, verdict


def _binormal(rng, d, n_pos=50, n_neg=100):
    """Scores N(d, 1) for positives and N(0, 1) for negatives -> (y, probs); true AUC = Phi(d / sqrt 2)."""
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    s = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
    p1 = 1 / (1 + np.exp(-s))
    return y, np.stack([1 - p1, p1], 1)


@pytest.mark.parametrize("c", [2, 3])
def test_point_estimates_match_compute_metrics(c):
    rng = np.random.default_rng(c)
    y = rng.integers(0, c, 90)
    logits = rng.normal(size=(90, c)) + 1.5 * np.eye(c)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = compute_metrics(y, p, [f"c{k}" for k in range(c)])
    got = metric_rows(y[None], p[None])
    for m in ("accuracy", "balanced_accuracy", "f1_macro", "auc"):
        assert got[m][0] == pytest.approx(ref[m], abs=1e-12), m


def test_bootstrap_ci_is_seeded_and_contains_the_estimate():
    y, p = _binormal(np.random.default_rng(0), 1.0)
    a, b = bootstrap_ci(y, p, n_boot=500, seed=3), bootstrap_ci(y, p, n_boot=500, seed=3)
    assert a == b
    est = compute_metrics(y, p, ["n", "p"])
    for m in ("accuracy", "auc", "f1_macro"):
        lo, hi = a[m]
        assert lo < est[m] < hi and hi - lo > 0.02


def test_bootstrap_ci_covers_the_true_auc_at_the_nominal_rate():
    rng = np.random.default_rng(1)
    d = 1.2
    true_auc = sps.norm.cdf(d / np.sqrt(2))
    hits = []
    for rep in range(200):
        y, p = _binormal(rng, d)
        lo, hi = bootstrap_ci(y, p, n_boot=400, seed=rep)["auc"]
        hits.append(lo <= true_auc <= hi)
    cover = np.mean(hits)
    assert 0.89 <= cover <= 0.99, cover  # nominal 0.95; a CI of the wrong width misses this band


def test_delong_rejects_a_known_difference_and_not_a_null_one():
    rng = np.random.default_rng(2)
    n_pos, n_neg = 80, 120
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    signal = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    good = 1.5 * signal + rng.normal(size=len(y))
    weak = 0.3 * signal + rng.normal(size=len(y))
    res = delong_test(y, good, weak)
    assert res["p"] < 1e-3 and res["diff"] > 0.2
    assert res["auc_a"] == pytest.approx(compute_metrics(y, np.stack([1 - sps.norm.cdf(good), sps.norm.cdf(good)], 1),
                                                         ["0", "1"])["auc"])
    rejections = 0
    for _ in range(300):  # two equally good, correlated scores: rejection rate ~ alpha
        shared = rng.normal(size=len(y))
        a = signal + shared + 0.7 * rng.normal(size=len(y))
        b = signal + shared + 0.7 * rng.normal(size=len(y))
        rejections += delong_test(y, a, b)["p"] < 0.05
    assert rejections / 300 < 0.09


def test_paired_bootstrap_power_and_null():
    rng = np.random.default_rng(4)
    y, good = _binormal(rng, 2.0, 60, 100)
    signal = y.astype(float)
    s_weak = 0.5 * signal + rng.normal(size=len(y))
    weak = np.stack([1 - sps.norm.cdf(s_weak), sps.norm.cdf(s_weak)], 1)
    res = paired_bootstrap(y, [good], [weak], "auc", n_boot=1000)
    assert res["diff"] > 0.2 and res["p"] < 0.01 and res["ci"][0] > 0
    assert verdict(res["diff"], res["p"]) == "beats"
    rejections = 0
    for rep in range(60):
        shared = rng.normal(size=len(y))
        sa = signal + shared + 0.7 * rng.normal(size=len(y))
        sb = signal + shared + 0.7 * rng.normal(size=len(y))
        pa = np.stack([1 - sps.norm.cdf(sa), sps.norm.cdf(sa)], 1)
        pb = np.stack([1 - sps.norm.cdf(sb), sps.norm.cdf(sb)], 1)
        rejections += paired_bootstrap(y, [pa], [pb], "auc", n_boot=400, seed=rep)["p"] < 0.05
    assert rejections / 60 < 0.15
    assert verdict(0.01, 0.3) == "not distinguishable" and verdict(-0.1, 0.001) == "below"


def test_paired_bootstrap_averages_seeds():
    rng = np.random.default_rng(5)
    y, p1 = _binormal(rng, 1.0)
    _, p2 = _binormal(np.random.default_rng(6), 1.0)
    res = paired_bootstrap(y, [p1, p2], [p1], "accuracy", n_boot=200)
    acc = [compute_metrics(y, p, ["0", "1"])["accuracy"] for p in (p1, p2)]
    assert res["a"] == pytest.approx(np.mean(acc)) and res["seeds_a"] == 2


def test_mcnemar():
    y = np.zeros(100, int)
    a = np.zeros(100, int)
    b = a.copy()
    b[:30] = 1  # B wrong on 30 images A gets right
    a[95:] = 1  # A wrong on 5 that B gets right
    res = mcnemar_test(y, a, b)
    assert (res["a_only_right"], res["b_only_right"]) == (30, 5) and res["p"] < 0.001
    assert mcnemar_test(y, a, a)["p"] == 1.0
