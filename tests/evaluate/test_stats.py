"""Bootstrap CIs and paired tests (dcube.evaluate.stats): agreement with the metrics module,
nominal coverage on a simulated case, power against a known difference and calibration under the null."""

import numpy as np
import pytest
from scipy import stats as sps

from dcube.evaluate import compute_metrics
from dcube.evaluate.stats import (bootstrap_ci, chunked_rows, delong_test, mcnemar_test, metric_rows, paired_bootstrap,
                                  stratified_indices, verdict)


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


@pytest.mark.parametrize("c, ties, absent", [(2, False, False), (2, True, False), (3, True, False), (4, True, True)])
def test_resampled_metrics_are_the_floats_of_gathering_and_ranking_each_resample(c, ties, absent):
    """chunked_rows counts multiplicities and ranks each score once: every metric of every resample must be
    exactly metric_rows of the gathered resample (ties in the scores, a class absent from y included)."""
    rng = np.random.default_rng(c)
    y = rng.integers(0, c - 1 if absent else c, 157)
    p = rng.dirichlet(np.ones(c), len(y))
    if ties:
        p = np.round(p, 1) + 1e-3
        p /= p.sum(1, keepdims=True)
    idx = stratified_indices(y, 300, seed=5)
    fast = chunked_rows(y, p, idx, chunk=70)
    slow = metric_rows(y[idx], p[idx])
    assert list(fast) == list(slow)
    for m in slow:
        np.testing.assert_array_equal(fast[m], slow[m], err_msg=m)
    assert np.isnan(fast["auc"]).all() == absent and np.ptp(fast["auc"][~np.isnan(fast["auc"])] if not absent
                                                             else fast["accuracy"]) > 0


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


# -- two-level bootstrap (seeds, then images) and Holm ------------------------------------------
from dcube.evaluate.stats import holm, two_level_bootstrap  # noqa: E402


def _two_level_runs(rng, y, k, seed_sd, shift=0.0):
    """k seeds of one arm: a score with a per-seed random strength (training noise) and per-image noise."""
    out = []
    for _ in range(k):
        strength = 1.0 + shift + rng.normal(0, seed_sd)
        z = strength * (2 * y - 1) + rng.normal(0, 1.5, len(y))
        p1 = 1 / (1 + np.exp(-z))
        out.append(np.stack([1 - p1, p1], axis=1))
    return out


def test_two_level_type_one_rate_on_a_simulated_two_level_null():
    """Two arms with the same distribution of training outcomes (a per-seed strength with sd 0.25, noise
    per image and run). The image-only bootstrap treats the 5 seeds as fixed and rejects this null far too
    often (0.33 at 300 x 300); the two-level one stays below the nominal rate (0.03)."""
    rng = np.random.default_rng(11)
    y = np.repeat([0, 1], 60)
    rej, rej_images_only = [], []
    for _ in range(160):
        a, b = _two_level_runs(rng, y, 5, 0.25), _two_level_runs(rng, y, 5, 0.25)
        rej.append(two_level_bootstrap(y, a, b, "auc", n_boot=150)["p"] < 0.05)
        rej_images_only.append(paired_bootstrap(y, a, b, "auc", n_boot=150)["p"] < 0.05)
    assert np.mean(rej) <= 0.06, np.mean(rej)
    assert np.mean(rej_images_only) > 0.15, np.mean(rej_images_only)  # why the image-only test was replaced


def test_two_level_covers_a_known_difference_and_detects_it():
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 150)
    # the truth: A's seed-mean AUC minus B's, from many seeds of each on these images
    big_a, big_b = _two_level_runs(rng, y, 200, 0.2, shift=0.6), _two_level_runs(rng, y, 200, 0.2)
    auc = lambda ps: np.mean([two_level_bootstrap(y, [p], metric="auc", n_boot=20)["mean"] for p in ps])  # noqa: E731
    truth = auc(big_a) - auc(big_b)
    covered, found = [], []
    for _ in range(60):
        r = two_level_bootstrap(y, _two_level_runs(rng, y, 5, 0.2, 0.6), _two_level_runs(rng, y, 5, 0.2),
                                "auc", n_boot=300)
        covered.append(r["ci"][0] <= truth <= r["ci"][1])
        found.append(r["p"] < 0.05 and r["diff"] > 0)
    assert truth > 0.03 and np.mean(covered) >= 0.88 and np.mean(found) >= 0.8, (truth, np.mean(covered), np.mean(found))


def test_two_level_with_one_arm_and_unpaired_seeds():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 40)
    one = two_level_bootstrap(y, _two_level_runs(rng, y, 3, 0.2), n_boot=200)
    assert one["ci"][0] < one["mean"] < one["ci"][1] and "p" not in one
    r = two_level_bootstrap(y, _two_level_runs(rng, y, 3, 0.2), _two_level_runs(rng, y, 5, 0.2), n_boot=200)
    assert not r["paired_seeds"] and r["seeds_b"] == 5 and 0 < r["p"] <= 1


def test_holm_on_a_hand_computed_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == []


def test_a_p_value_below_the_printed_precision_is_never_printed_as_zero():
    from dcube.evaluate.stats import format_p

    assert format_p(3e-6) == "p < 0.001" and format_p(0.0) == "p < 0.001"
    assert format_p(0.0042, "Holm p", 2) == "Holm p < 0.01" and format_p(0.042) == "p = 0.042"
    assert format_p(0.001) == "p = 0.001" and format_p(1.0, "Holm p", 2) == "Holm p = 1.00"


def test_no_verdict_with_fewer_than_three_seeds_whatever_the_p_value():
    from dcube.evaluate.stats import result_verdict

    assert verdict(0.05, 0.001, seeds=2).startswith("not distinguishable")
    assert verdict(0.05, 0.001, seeds=3) == "beats"
    r = {"diff": 0.05, "p": 0.001, "seeds_a": 5, "seeds_b": 2}
    assert result_verdict(r).startswith("not distinguishable") and result_verdict({**r, "seeds_b": 3}) == "beats"
    assert result_verdict({**r, "seeds_b": 3}, p=0.2) == "not distinguishable"  # the adjusted p decides
    assert result_verdict({**r, "seeds_b": 1}) == "beats"  # one run: a fixed reference, the other arm's 5 count
    assert result_verdict({**r, "seeds_a": 2, "seeds_b": 1}).startswith("not distinguishable")
