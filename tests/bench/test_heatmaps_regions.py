"""bench.heatmaps' regions and deletion test (issue 13): the centre is the gap between the lung fields, and
the deletion drop names the region a model rests on."""

import numpy as np
import torch

from bench.heatmaps import _ring, centre_band, deletion


def test_centre_band_is_the_gap_between_two_fields():
    field = torch.zeros(12, 12, dtype=torch.bool)
    field[3:9, 2:5] = True  # one lung
    field[4:10, 7:10] = True  # the other
    centre = centre_band(field)
    assert not (centre & field).any()
    assert centre[5, 5] and centre[5, 6]  # between the two fields
    assert not centre[5, 1] and not centre[5, 10]  # outside them
    assert not centre[1].any() and not centre[11].any()  # rows without lung field
    assert centre[3, 5:].sum() == 0  # row 3 has only the first field: nothing right of it


class _Reader:
    """A stand-in Predictor whose class-1 probability is the mean of the pixels in one region."""

    def __init__(self, region):
        self.region = region

    def __call__(self, x):
        p1 = torch.sigmoid(8 * x[:, 0][:, self.region].mean(1)).double().numpy()
        probs = np.stack([1 - p1, p1], 1)
        return probs, probs


def test_deletion_drops_only_where_the_model_reads():
    ring = _ring(9)
    inner = ~ring
    X = torch.full((3, 1, 9, 9), -1.0)
    X[:, :, inner] = 1.0  # bright interior, dark border: the image mean lies between
    reader = _Reader(inner)
    on_inner = deletion(reader, X, reader(X)[1], [1, 1, 1], inner)
    on_ring = deletion(reader, X, reader(X)[1], [1, 1, 1], ring)
    assert min(on_inner) > 0.1  # the region the model reads: its probability falls (0.157 here)
    assert max(abs(d) for d in on_ring) < 1e-9  # a region it ignores: nothing changes


def test_deletion_contrast_separates_a_real_difference_from_none():
    from bench.heatmaps import _deletion_contrasts

    rng = np.random.default_rng(0)
    lung = rng.normal(0.05, 0.05, 40)
    deletion = {"lung field": {"drops": lung.tolist()},
                "centre": {"drops": (lung + 0.2 + rng.normal(0, 0.05, 40)).tolist()},
                "border ring": {"drops": (lung + rng.normal(0, 0.05, 40)).tolist()}}
    centre, border = _deletion_contrasts(deletion)
    assert centre.startswith("- centre minus lung field") and "Wilcoxon p < 0.001" in centre
    low, high = (float(v) for v in centre.split("[")[1].split("]")[0].split(", "))
    assert 0.15 < low < 0.2 < high < 0.25  # the CI brackets the true +0.2 and excludes 0
    low, high = (float(v) for v in border.split("[")[1].split("]")[0].split(", "))
    assert low < 0 < high  # no difference: the CI covers 0
