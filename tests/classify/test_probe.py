import numpy as np
import torch

from dcube.classify.probe import fit_linear_probe, frozen_embeddings


def test_frozen_embeddings_are_pooled_imagenet_features_and_deterministic():
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    a = frozen_embeddings(x, batch_size=4, progress=False)
    assert a.shape == (6, 1280) and np.isfinite(a).all()
    assert np.allclose(a, frozen_embeddings(x, batch_size=6, progress=False), atol=1e-5)
    assert not np.allclose(a[0], a[1])


def test_probe_chooses_c_on_validation_only():
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    x = rng.normal(size=(60, 5)) + y[:, None] * 1.5
    seen = []

    def score(y_true, probs):  # prefers the most regularised model, whatever the data say
        seen.append(len(y_true))
        return -len(seen)

    out = fit_linear_probe(x[:40], y[:40], x[40:], y[40:], score, c_grid=(0.01, 1.0))
    assert out["C"] == 0.01 and seen == [20, 20]
    acc = (out["model"].predict(x[40:]) == y[40:]).mean()
    assert acc > 0.8
