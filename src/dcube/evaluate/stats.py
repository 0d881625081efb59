"""Confidence intervals and paired tests: what makes a number in a table defensible.

* :func:`bootstrap_ci` - stratified percentile bootstrap (resampling within each true class, so every
  resample keeps the class counts and the AUC stays defined) of accuracy, balanced accuracy,
  macro-F1 and ROC-AUC. Seeded: the same inputs give the same interval.
* :func:`paired_bootstrap` - the difference of a metric between two models scored on the SAME test
  images (optionally the mean over several seeds of each), with the images resampled jointly; a CI
  of the difference and a two-sided bootstrap p-value.
* :func:`two_level_bootstrap` - the same difference (or one model's seed mean) with BOTH sources of
  variation: the seeds (training) and the test images. What the benchmark tables use.
* :func:`holm` - Holm's step-down adjustment of a family of p-values.
* :func:`delong_test` - DeLong, DeLong & Clarke-Pearson (1988) for two correlated binary ROC AUCs.
* :func:`mcnemar_test` - exact McNemar test on the discordant decisions (scipy's binomial test).

Written here because neither scipy, scikit-learn nor torchmetrics offers a paired AUC test or a
stratified, vectorised bootstrap of these metrics; the metric conventions are those of
:mod:`dcube.evaluate.metrics` (binary decision: class-1 probability > 0.5; multi-class AUC:
unweighted one-vs-rest mean), and the point estimates agree with it exactly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats

METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "auc")
N_BOOT = 2000


def _decide(p: np.ndarray) -> np.ndarray:
    """(..., C) probabilities -> (...) decisions, the rule of dcube.evaluate.metrics.predict."""
    if p.shape[-1] == 2:
        return (p[..., 1] > 0.5).astype(np.int64)
    return p.argmax(axis=-1)


def _auc_rows(pos: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC-AUC of every row: pos bool (B, n), score (B, n); ties count one half (= scikit-learn)."""
    r = stats.rankdata(score, axis=1)
    n1 = pos.sum(axis=1)
    n0 = pos.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((r * pos).sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)


MAX_AUC_CLASSES = 100  # above this many classes the macro AUC is not resampled (one rank pass per class and row)


def auc_of(pos: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC of one score (ties count one half), = scikit-learn's, without its per-call overhead."""
    return float(_auc_rows(np.asarray(pos, bool)[None], np.asarray(score, np.float64)[None])[0])


def metric_rows(y: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of METRICS for each row of y (B, n) int and probs (B, n, C); the macro AUC is NaN above
    MAX_AUC_CLASSES classes. Per-class counts by one bincount per row block, so 1,000 classes cost seconds."""
    b, c = y.shape[0], probs.shape[-1]
    pred = _decide(probs)
    out = {"accuracy": (pred == y).mean(axis=1)}
    base = (np.arange(b) * c)[:, None]

    def counts(keys):
        return np.bincount(keys.ravel(), minlength=b * c).reshape(b, c).astype(np.float64)

    tp, support, predicted = counts((base + y)[pred == y]), counts(base + y), counts(base + pred)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(support > 0, tp / support, 0.0)
        pr = np.where(predicted > 0, tp / predicted, 0.0)
        f = np.where(pr + r > 0, 2 * pr * r / (pr + r), 0.0)
    out["balanced_accuracy"] = r.mean(axis=1)
    out["f1_macro"] = f.mean(axis=1)
    if c == 2:
        out["auc"] = _auc_rows(y == 1, probs[..., 1])
    elif c > MAX_AUC_CLASSES:
        out["auc"] = np.full(b, np.nan)
    else:
        out["auc"] = np.mean([_auc_rows(y == k, probs[..., k]) for k in range(c)], axis=0)
    return out


def stratified_indices(y: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) resampled row indices (int32); each resample keeps every class's count."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(y)), dtype=np.int32)
    col = 0
    for k in np.unique(y):
        rows = np.flatnonzero(y == k)
        # drawn 100 resamples at a time: the same stream as one (n_boot, m) draw, in O(100 m) memory
        for a in range(0, n_boot, 100):
            b = min(a + 100, n_boot)
            out[a:b, col:col + len(rows)] = rows[rng.integers(0, len(rows), size=(b - a, len(rows)))]
        col += len(rows)
    return out


class _Resampler:
    """METRICS of the resamples of one run's (y, p), from each resample's multiplicity of every image: the
    class counts by one matrix product, the AUC from scores ranked once (Mann-Whitney U over tie groups in
    score order). Every count, and U, is a sum of integers or halves, exact in float64, so the numbers are
    the very floats metric_rows(y[idx], p[idx]) gives, without gathering probabilities or ranking each
    resample."""

    def __init__(self, y: np.ndarray, p: np.ndarray):
        c = p.shape[-1]
        pred = _decide(p)
        eye = np.eye(c)
        self.n = len(y)
        self.support, self.predicted = eye[y], eye[pred]  # (n, C) one-hot
        self.hit = self.support * (pred == y)[:, None]
        self.ranked = []  # per AUC column: (order, first sorted position of each tie group, positives in order)
        for k in ([1] if c == 2 else range(c)):
            order = np.argsort(p[:, k], kind="stable")
            s = p[order, k]
            self.ranked.append((order, np.flatnonzero(np.r_[True, s[1:] != s[:-1]]), (y == k)[order]))

    def rows(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        b, m = idx.shape
        w = np.bincount((np.arange(b)[:, None] * self.n + idx).ravel(), minlength=b * self.n)
        w = w.reshape(b, self.n).astype(np.float64)  # w[r, i]: how often resample r drew image i
        tp, support, predicted = w @ self.hit, w @ self.support, w @ self.predicted
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(support > 0, tp / support, 0.0)
            pr = np.where(predicted > 0, tp / predicted, 0.0)
            f = np.where(pr + r > 0, 2 * pr * r / (pr + r), 0.0)
        out = {"accuracy": tp.sum(axis=1) / m, "balanced_accuracy": r.mean(axis=1), "f1_macro": f.mean(axis=1)}
        aucs = []
        for order, starts, pos in self.ranked:
            ws = w[:, order]
            npos = np.add.reduceat(np.where(pos, ws, 0.0), starts, axis=1)  # per tie group
            nneg = np.add.reduceat(np.where(pos, 0.0, ws), starts, axis=1)
            u = (npos * (np.cumsum(nneg, axis=1) - 0.5 * nneg)).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                aucs.append(u / (npos.sum(axis=1) * nneg.sum(axis=1)))
        out["auc"] = aucs[0] if len(aucs) == 1 else np.mean(aucs, axis=0)
        return out


def chunked_rows(y: np.ndarray, p: np.ndarray, idx: np.ndarray, chunk: int = 100) -> dict[str, np.ndarray]:
    """`metric_rows(y[idx], p[idx])`, `chunk` resamples at a time: the same numbers in O(chunk x n) memory
    (all resamples at once held n_boot x n x C float64: 1.6 GB for 10k test images). By multiplicities
    (_Resampler) unless there are more than MAX_AUC_CLASSES classes or a probability is not finite."""
    if p.shape[-1] <= MAX_AUC_CLASSES and np.isfinite(p).all():
        rows = _Resampler(y, p).rows
    else:
        def rows(i):
            return metric_rows(y[i], p[i])
    parts = [rows(idx[a:a + chunk]) for a in range(0, len(idx), chunk)]
    return {m: np.concatenate([q[m] for q in parts]) for m in parts[0]}


def _check(y, probs) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).reshape(-1).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probs: expected shape ({len(y)}, C), got {p.shape}")
    if len(np.unique(y)) < 2:
        raise ValueError("y: a confidence interval of these metrics needs at least two classes present")
    return y, p


def bootstrap_ci(y, probs, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile CIs of METRICS: ``{metric: [low, high], "method": ..., "n_boot": ..., "seed": ...}``.

    Resampling is within each true class (stratified), so n per class is fixed and the AUC is
    defined in every resample (classes absent from y are left out of the resamples as well)."""
    if len(np.unique(np.asarray(y))) < 2:
        return {"note": "no CI: fewer than two classes present", "level": level}
    y, p = _check(y, probs)
    idx = stratified_indices(y, n_boot, seed)
    rows = chunked_rows(y, p, idx)
    a = (1 - level) / 2
    out = {m: [float(np.nanquantile(v, a)), float(np.nanquantile(v, 1 - a))] for m, v in rows.items()
           if not np.isnan(v).all()}
    if "auc" not in out:
        out["auc_note"] = f"no AUC CI above {MAX_AUC_CLASSES} classes"
    out.update(method=f"stratified percentile bootstrap, {n_boot} resamples, seed {seed}", level=level,
               n_boot=n_boot, seed=seed)
    return out


def paired_bootstrap(y, probs_a: Sequence, probs_b: Sequence, metric: str = "auc", n_boot: int = N_BOOT,
                     seed: int = 0, level: float = 0.95) -> dict:
    """Difference ``mean_seeds(metric(A)) - mean_seeds(metric(B))`` on the same test images.

    `probs_a`, `probs_b`: one (n, C) array per seed (or a single array). The test images are
    resampled jointly for every model and seed (stratified), so the CI and the p-value account for
    the test-set sampling of a paired design; the spread over seeds is in the mean ± std beside it.
    p: two-sided, ``2 * min(P*(diff <= 0), P*(diff >= 0))`` over the resamples (floored at 1/n_boot).
    """
    if metric not in METRICS:
        raise ValueError(f"metric: {metric!r} is not one of {list(METRICS)}")
    pa = [np.asarray(p, dtype=np.float64) for p in (probs_a if isinstance(probs_a, (list, tuple)) else [probs_a])]
    pb = [np.asarray(p, dtype=np.float64) for p in (probs_b if isinstance(probs_b, (list, tuple)) else [probs_b])]
    y, _ = _check(y, pa[0])
    for p in pa + pb:
        _check(y, p)
    idx = stratified_indices(y, n_boot, seed)

    def mean_metric(ps, rows=None):
        if rows is None:
            return float(np.mean([metric_rows(y[None], p[None])[metric][0] for p in ps]))
        return np.mean([chunked_rows(y, p, idx)[metric] for p in ps], axis=0)

    diff = mean_metric(pa) - mean_metric(pb)
    boot = mean_metric(pa, idx) - mean_metric(pb, idx)
    a = (1 - level) / 2
    p = 2 * min((boot <= 0).mean(), (boot >= 0).mean())
    return {"metric": metric, "a": mean_metric(pa), "b": mean_metric(pb), "diff": diff,
            "ci": [float(np.quantile(boot, a)), float(np.quantile(boot, 1 - a))],
            "p": float(min(1.0, max(p, 1.0 / n_boot))), "seeds_a": len(pa), "seeds_b": len(pb),
            "method": f"paired stratified bootstrap over test images, {n_boot} resamples, seed {seed}"}


def two_level_bootstrap(y, probs_a: Sequence, probs_b: Sequence | None = None, metric: str = "auc",
                        n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95, paired: bool = True) -> dict:
    """Seed-mean `metric` of A (minus that of B) with a CI and p-value that count the seeds AND the images.

    `probs_a`, `probs_b`: one (n, C) array per seed, every array on the same test images `y`. Each of
    `n_boot` replicates resamples the test images (stratified by class, jointly for every run), then the
    seeds with replacement (with `paired`, A's and B's runs of the same position are drawn together: the
    same seed in both arms). The seed draws' deviations are scaled by sqrt(k / (k - 1)) so that the seed
    part of the variance is the unbiased one (a plain bootstrap of k seeds has (k - 1) / k of it).
    The standard error is the replicates' standard deviation; the CI is diff +- t * se and the p-value
    (H0: diff = 0, two-sided) comes from a t distribution with Satterthwaite's degrees of freedom (the
    seed part has k - 1, the image part many): with 3 or 5 seeds and training noise that dominates, a
    normal or percentile reference rejects a true null too often. With B = None: a CI of A's seed mean
    (``mean``), no p-value."""
    if metric not in METRICS:
        raise ValueError(f"metric: {metric!r} is not one of {list(METRICS)}")
    arms = [[np.asarray(p, dtype=np.float64) for p in ps] for ps in ([probs_a] if probs_b is None else [probs_a, probs_b])]
    y, _ = _check(y, arms[0][0])
    for p in (q for arm in arms for q in arm):
        _check(y, p)
    paired = paired and probs_b is not None and len(arms[0]) == len(arms[1])
    idx = stratified_indices(y, n_boot, seed)
    rng = np.random.default_rng(seed + 1)
    full = [np.array([metric_rows(y[None], p[None])[metric][0] for p in arm]) for arm in arms]  # (k,) per arm
    boot = [np.stack([chunked_rows(y, p, idx)[metric] for p in arm]) for arm in arms]  # (k, n_boot) per arm
    if paired:  # one arm of per-seed differences
        full, boot = [full[0] - full[1]], [boot[0] - boot[1]]
    sign = [1.0, -1.0]
    reps, seed_var, df_terms = np.zeros(n_boot), 0.0, 0.0
    for j, (f, b) in enumerate(zip(full, boot)):
        k = len(f)
        mean_b = b.mean(axis=0)  # every seed, these images
        if k > 1:
            draw = rng.integers(0, k, size=(n_boot, k))
            drawn = np.take_along_axis(b.T, draw, axis=1).mean(axis=1)
            reps += sign[j] * (mean_b + np.sqrt(k / (k - 1)) * (drawn - mean_b))
            v = float(np.var(f, ddof=1)) / k
            seed_var += v
            df_terms += v ** 2 / (k - 1)
        else:
            reps += sign[j] * mean_b
    diff = float(sum(sign[j] * f.mean() for j, f in enumerate(full)))
    se = float(np.std(reps, ddof=1))
    image_var = max(se ** 2 - seed_var, 0.0)
    df = float("inf") if df_terms == 0 else (seed_var + image_var) ** 2 / df_terms
    q = float(stats.t.ppf(1 - (1 - level) / 2, df)) if np.isfinite(df) else float(stats.norm.ppf(1 - (1 - level) / 2))
    out = {"metric": metric, "diff" if probs_b is not None else "mean": diff,
           "ci": [diff - q * se, diff + q * se], "se": se, "df": df, "seeds_a": len(arms[0]),
           "seeds_b": len(arms[1]) if probs_b is not None else 0,
           "variance": {"seeds": seed_var, "images": image_var}, "n_boot": n_boot, "paired_seeds": paired,
           "method": f"two-level bootstrap (stratified test images, then seeds{', paired' if paired else ''}), "
                     f"{n_boot} resamples, seed {seed}; t with Satterthwaite df"}
    if probs_b is not None:
        out["a"] = float(full[0].mean()) if not paired else float(np.mean([metric_rows(y[None], p[None])[metric][0]
                                                                           for p in arms[0]]))
        out["b"] = out["a"] - diff
        if se > 0:
            t = diff / se
            out["p"] = float(2 * (stats.t.sf(abs(t), df) if np.isfinite(df) else stats.norm.sf(abs(t))))
        else:
            out["p"] = 1.0 if diff == 0 else 0.0
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's (1979) step-down adjusted p-values of one family, in the order given: the i-th smallest p
    times (m - i + 1), made monotone, capped at 1. Controls the family-wise error rate."""
    p = np.asarray(list(pvalues), dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj
    return out.tolist()


def format_p(p: float, name: str = "p", digits: int = 3) -> str:
    """`name = p` at `digits` decimals, or `name < 10**-digits` when p is below that precision: a printed zero
    would claim a p of zero."""
    floor = 10.0 ** -digits
    return f"{name} < {floor:.{digits}f}" if p < floor else f"{name} = {p:.{digits}f}"


def seed_mean_ci(y, probs: Sequence, metric: str = "auc", n_boot: int = N_BOOT, seed: int = 0,
                 level: float = 0.95) -> list[float]:
    """Percentile CI of the mean over seeds of `metric`, the test images resampled jointly (stratified)."""
    ps = [np.asarray(p, dtype=np.float64) for p in probs]
    y, _ = _check(y, ps[0])
    idx = stratified_indices(y, n_boot, seed)
    boot = np.mean([chunked_rows(y, p, idx)[metric] for p in ps], axis=0)
    a = (1 - level) / 2
    return [float(np.quantile(boot, a)), float(np.quantile(boot, 1 - a))]


def delong_test(y, score_a, score_b) -> dict:
    """DeLong's test of AUC(A) = AUC(B) for two scores of the same binary test images (class 1 positive).

    Returns ``{"auc_a", "auc_b", "diff", "se", "z", "p"}`` (two-sided normal p-value)."""
    y = np.asarray(y).reshape(-1).astype(np.int64)
    s = np.stack([np.asarray(score_a, dtype=np.float64).reshape(-1), np.asarray(score_b, dtype=np.float64).reshape(-1)])
    if set(np.unique(y).tolist()) != {0, 1} or s.shape[1] != len(y):
        raise ValueError("delong_test: needs binary labels 0/1 with both present and one score per label")
    pos, neg = s[:, y == 1], s[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    v10, v01, auc = [], [], []
    for k in range(2):
        tz = stats.rankdata(np.concatenate([pos[k], neg[k]]))
        tx, ty = stats.rankdata(pos[k]), stats.rankdata(neg[k])
        a = (tz[:m] - tx) / n  # per positive: share of negatives below it
        b = 1.0 - (tz[m:] - ty) / m  # per negative: share of positives above it
        v10.append(a)
        v01.append(b)
        auc.append(a.mean())
    s10, s01 = np.cov(np.stack(v10)), np.cov(np.stack(v01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    diff = auc[0] - auc[1]
    se = float(np.sqrt(max(var, 0.0)))
    if se == 0.0:
        z, p = 0.0, 1.0 if diff == 0 else 0.0
    else:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "diff": float(diff), "se": se, "z": float(z),
            "p": p, "method": "DeLong (1988)"}


def mcnemar_test(y, pred_a, pred_b) -> dict:
    """Exact McNemar test of equal accuracy from the discordant pairs (A right/B wrong vs the reverse)."""
    y, a, b = (np.asarray(v).reshape(-1) for v in (y, pred_a, pred_b))
    if not len(y) == len(a) == len(b):
        raise ValueError("mcnemar_test: y, pred_a and pred_b must have the same length")
    ra, rb = a == y, b == y
    n01, n10 = int((ra & ~rb).sum()), int((~ra & rb).sum())
    p = 1.0 if n01 + n10 == 0 else float(stats.binomtest(n01, n01 + n10, 0.5).pvalue)
    return {"a_only_right": n01, "b_only_right": n10, "diff": float(ra.mean() - rb.mean()), "p": p,
            "method": "exact McNemar (binomial test on discordant pairs)"}


MIN_SEEDS = 3  # fewer seeds per arm than this: no verdict, whatever the p-value (training noise is barely sampled)


def verdict(diff: float, p: float, alpha: float = 0.05, seeds: int | None = None) -> str:
    """'beats' / 'below' only with p < alpha and, when `seeds` (the fewer of the two arms') is given, at least
    MIN_SEEDS of them; otherwise 'not distinguishable'."""
    if seeds is not None and seeds < MIN_SEEDS:
        return f"not distinguishable (fewer than {MIN_SEEDS} seeds)"
    if p < alpha:
        return "beats" if diff > 0 else "below"
    return "not distinguishable"


def result_verdict(r: dict, p: float | None = None) -> str:
    """verdict() of a two_level_bootstrap result, at `p` (e.g. Holm-adjusted; default its own p). The seeds that
    count are the fewer of the two arms'; an arm of one run is a fixed reference (a deterministic baseline such
    as a linear probe), so then the other arm's count applies."""
    counts = [n for n in (r.get("seeds_a"), r.get("seeds_b")) if n and n > 1]
    seeds = min(counts) if counts else 1
    return verdict(r["diff"], r["p"] if p is None else p, seeds=seeds)
