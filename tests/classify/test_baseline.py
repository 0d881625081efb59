import pytest
import torch

from dcube.classify.baseline import BEST, BaselineConfig, train_baseline
from dcube.data import DataBundle, Split
from dcube.generate import SyntheticSet
from dcube.generate.synthetic import train_fingerprint
from dcube.utils.io import load_tensors


def _bundle(n=16, size=8):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.rand(n, 1, size, size, generator=g) * 0.5 - 0.25 + (y.float()[:, None, None, None] - 0.5)
    s = Split(x, y, [f"i{i}" for i in range(n)])
    return DataBundle(s, Split(x[:6], y[:6], list("abcdef")), Split(x[6:], y[6:], [f"t{i}" for i in range(10)]),
                      ["neg", "pos"])


def test_best_epoch_is_chosen_on_validation_and_synthetic_images_are_counted(tmp_path):
    data = _bundle()
    scores = iter([0.2, 0.9, 0.5])
    calls = []

    def score(y, p):
        calls.append(len(y))
        return next(scores)

    synth = SyntheticSet(data.train.images[:4] * 0.9, data.train.labels[:4], [f"synthetic:{i}" for i in range(4)],
                         data.class_names, {"train_sha256": train_fingerprint(data.train)})
    out = train_baseline(BaselineConfig(epochs=3, batch_size=8, ema_decay=0.9, synthetic_ratio=0.125), data,
                         tmp_path, score, seed=0, synthetic=synth)
    assert calls == [6, 6, 6]  # the validation split, once per epoch
    assert out["best_epoch"] == 2 and out["n_train_real"] == 16 and out["n_train_synthetic"] == 2
    assert out["test_probs"].shape == (10, 2) and torch.allclose(out["test_probs"].sum(1), torch.ones(10))
    assert load_tensors(tmp_path / BEST)[1]["best_epoch"] == 2


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="baseline.model"):
        BaselineConfig(model="vgg")
    with pytest.raises(ValueError, match="baseline.epochs"):
        BaselineConfig(epochs=0)
    with pytest.raises(ValueError, match="baseline.min_steps"):
        BaselineConfig(min_steps=-1)


def test_min_steps_repeats_a_small_training_set_within_each_epoch(tmp_path, monkeypatch):
    data = _bundle()  # 16 training images, batches of 8: 2 steps per pass
    cfg = BaselineConfig(epochs=2, batch_size=8, min_steps=7)
    assert cfg.passes_for(16) == 2  # 2 epochs x 2 passes x 2 batches = 8 >= 7 steps
    assert BaselineConfig(epochs=4, batch_size=8, min_steps=7).passes_for(16) == 1  # already enough steps
    import dcube.classify.baseline as mod

    seen = []
    real = mod.epoch_batches
    monkeypatch.setattr(mod, "epoch_batches", lambda *a: seen.append(real(*a)) or seen[-1])
    res = train_baseline(cfg, data, tmp_path, lambda y, p: 0.0, progress=False)
    assert len(res["history"]) == 2  # validation once per epoch
    assert [len(b) for b in seen] == [4, 4]  # 4 optimiser steps per epoch
    assert all(sorted(torch.cat(b).tolist()) == sorted(list(range(16)) * 2) for b in seen)  # every image twice


def test_lr_drops_at_the_milestones_and_an_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    data = _bundle()
    score = lambda y, p: float(p[:, 1][y == 1].mean() - p[:, 1][y == 0].mean())  # noqa: E731
    cfg = BaselineConfig(epochs=4, batch_size=8, lr_milestones=(0.5, 0.75), ema_decay=0.5)
    assert cfg.milestone_epochs() == [2, 3]
    full = train_baseline(cfg, data, tmp_path / "full", score, seed=1, progress=False)
    assert [h["lr"] for h in full["history"]] == pytest.approx([1e-3, 1e-4, 1e-5, 1e-5])

    from dcube.utils.engine import Engine

    real_save, calls = Engine.save, []

    def crash_after_two_epochs(self, **meta):  # the resumable checkpoint is written, then the process dies
        calls.append(real_save(self, **meta))
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "save", crash_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        train_baseline(cfg, data, tmp_path / "cut", score, seed=1, progress=False)
    monkeypatch.setattr(Engine, "save", real_save)
    resumed = train_baseline(cfg, data, tmp_path / "cut", score, seed=1, progress=False)
    assert torch.equal(resumed["test_probs"], full["test_probs"])
    assert [h["val_score"] for h in resumed["history"]] == [h["val_score"] for h in full["history"]]
    with pytest.raises(RuntimeError, match="another configuration"):
        train_baseline(BaselineConfig(epochs=5, batch_size=8), data, tmp_path / "cut", score, seed=1, progress=False)
    with pytest.raises(ValueError, match="lr_milestones"):
        BaselineConfig(lr_milestones=(1.5,))


def test_fixmatch_loss_masks_low_confidence_images_by_hand():
    import math

    from dcube.classify.baseline import fixmatch_loss

    weak = torch.tensor([[4.0, 0.0], [1.0, 0.0], [0.0, 5.0]], requires_grad=True)  # confidences .982, .731, .993
    strong = torch.zeros(3, 2, requires_grad=True)  # cross-entropy log 2 to either class
    loss, mask = fixmatch_loss(weak, strong, 0.95)
    assert mask.tolist() == [1.0, 0.0, 1.0]
    assert loss.item() == pytest.approx(2 * math.log(2) / 3)  # the masked image counts 0 in a mean over all 3
    loss.backward()
    assert weak.grad is None or not weak.grad.any()  # no gradient through the pseudo-label
    assert strong.grad[1].abs().sum() == 0 and strong.grad[0].abs().sum() > 0


def test_fixmatch_trains_on_the_unlabelled_pool_and_needs_one(tmp_path):
    from dcube.classify.baseline import strong_view, weak_view

    data = _bundle()
    with pytest.raises(ValueError, match="needs unlabelled images"):
        train_baseline(BaselineConfig(epochs=1, batch_size=8, fixmatch=True), data, tmp_path / "a", lambda y, p: 0.5)
    g = torch.Generator().manual_seed(1)
    data.unlabelled = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    out = train_baseline(BaselineConfig(epochs=2, batch_size=8, fixmatch=True, unlabelled_ratio=2, threshold=0.5),
                         data, tmp_path / "b", lambda y, p: float(p[:, 1].mean()), seed=0)
    assert all(0 <= h["pseudo_label_share"] <= 1 for h in out["history"])
    x = data.unlabelled[:4]
    w, s = weak_view(x, torch.Generator().manual_seed(0)), strong_view(x, torch.Generator().manual_seed(0))
    assert w.shape == s.shape == x.shape and s.min() >= -1 and s.max() <= 1 and not torch.equal(w, s)
    with pytest.raises(ValueError, match="FixMatch"):
        BaselineConfig(fixmatch=True, threshold=1.5)
