"""bench.learning_curves: the registered runs, and the out-of-domain pool's secondary comparison."""

import numpy as np

import bench.common
from bench.learning_curves import OUT_OF_DOMAIN, REFERENCE, _out_of_domain, registered


def test_the_out_of_domain_dataset_runs_only_the_reference_arm_at_the_few_label_points():
    runs = registered()
    ood = [r for r in runs if r[0] == OUT_OF_DOMAIN]
    assert {(p, a) for _, p, a, _ in ood} == {(10, REFERENCE), (50, REFERENCE)}
    assert len(ood) == 10  # 5 seeds at each few-label point
    assert len(runs) == 3 * 7 * (2 * 5 + 2 * 3) + 10  # three datasets x seven arms, 5 / 3 seeds per point
    assert runs.index(("breastmnist", 10, REFERENCE, 4)) < runs.index(("breastmnist", 50, REFERENCE, 0))


def test_the_out_of_domain_comparison_is_the_bigger_pool_minus_the_own_rest_paired_by_seed(monkeypatch):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    monkeypatch.setattr(bench.common, "test_labels", lambda cfg, seed: y)

    def run(ds, seed, good):
        noise = rng.uniform(0, 1, (len(y), 2))
        p = np.eye(2)[y] * 0.8 + 0.2 * noise if good else noise
        p = p / p.sum(1, keepdims=True)
        return {"dataset": ds, "point": 10, "arm": REFERENCE, "seed": seed, "data_config": {"name": ds},
                "test": {"f1_macro": 0.5, "auc": 0.5}, "test_probs": p.tolist()}

    better = [run(OUT_OF_DOMAIN, s, True) for s in range(3)]
    own = [run("pneumoniamnist", s, False) for s in range(3)]
    text = "\n".join(_out_of_domain(better, own))
    row = next(line for line in text.split("\n") if line.startswith("| 10 |"))
    assert row.count("beats") == 2  # macro-F1 and AUC, each Holm-adjusted in its own family
    assert "2 comparison(s)" in text
    worse = _out_of_domain([{**r, "dataset": OUT_OF_DOMAIN} for r in own], better)  # the sign follows the order
    assert "\n".join(worse).count("below") == 2
