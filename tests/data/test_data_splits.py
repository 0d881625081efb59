"""The pure split functions: sizes, stratification, grouping, determinism."""

import numpy as np

from dcube.data.splits import allocate, grouped_split, stratified_split, stratified_subsample


def test_allocate_sums_and_bounds():
    counts = np.array([5, 30, 65])
    q = allocate(counts, 10, np.zeros(3, int), counts)
    assert q.sum() == 10 and q.tolist() == [1, 3, 6]
    q = allocate(counts, 10, np.ones(3, int), counts)
    assert q.sum() == 10 and q.min() >= 1


def test_stratified_split():
    y = np.array([0] * 50 + [1] * 150 + [2] * 3)
    s = stratified_split(y, 0.1, 0.2, seed=7)
    assert [(s == k).sum() for k in ("train", "val", "test")] == [142, 20, 41]
    assert ((s == "train") & (y == 2)).any()  # a tiny class keeps a training image
    assert (s == stratified_split(y, 0.1, 0.2, seed=7)).all()
    assert (s != stratified_split(y, 0.1, 0.2, seed=8)).any()
    assert (stratified_split(y, 0.0, 0.2, 0) != "val").all()


def test_grouped_split_keeps_groups_together():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 60, 500)
    y = groups % 3  # one label per group
    s = grouped_split(y, groups, 0.1, 0.2, seed=1)
    for g in np.unique(groups):
        assert len(set(s[groups == g])) == 1
    sizes = {k: (s == k).mean() for k in ("train", "val", "test")}
    assert abs(sizes["test"] - 0.2) < 0.06 and abs(sizes["val"] - 0.1) < 0.06
    for k in ("val", "test"):
        assert set(y[s == k]) == {0, 1, 2}
    assert (s == grouped_split(y, groups, 0.1, 0.2, seed=1)).all()


def test_stratified_subsample():
    y = np.array([0] * 990 + [1] * 10)
    i = stratified_subsample(y, 50, seed=0)
    assert len(i) == 50 and (np.diff(i) > 0).all() and (y[i] == 1).sum() == 1
    assert (i == stratified_subsample(y, 50, seed=0)).all()
    assert len(stratified_subsample(y, 5000, seed=0)) == 1000


def test_labelled_per_class_subsets_are_nested_stratified_seeded_and_the_rest_never_labelled(shared_data):
    """data.labelled_per_class: k per class (all of a smaller class), the k=10 set inside the k=50 set inside the
    k=250 set for one seed; with unlabelled_rest the other training images reach step 1 only: never a labelled
    split, validation or test."""
    import numpy as np

    from dcube.config import DataConfig
    from dcube.data import load_data

    npz = str(shared_data / "medmnist" / "breastmnist.npz")
    sets = {}
    for k in (10, 50, 250):
        b = load_data(DataConfig(name="breastmnist", path=npz, labelled_per_class=k, unlabelled_rest=True), seed=3)
        counts = np.bincount(b.train.labels.numpy(), minlength=2)
        assert counts.tolist() == [min(k, 147), min(k, 399)], counts  # malignant has 147 training images
        sets[k] = set(b.train.ids)
        pool = set(b.unlabelled_ids)
        assert not pool & sets[k] and not pool & set(b.val.ids) and not pool & set(b.test.ids)
        assert len(pool) + len(sets[k]) == 546
    assert sets[10] < sets[50] < sets[250]
    other = load_data(DataConfig(name="breastmnist", path=npz, labelled_per_class=10), seed=4)
    assert set(other.train.ids) != sets[10]
