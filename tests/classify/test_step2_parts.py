"""The parts of step 2 that must each act: the cycle loss (its gradient share on a class-sensitive
denoiser), raw global-sum class scores, random flips from the cached flipped features."""

import pytest
import torch
from torch import nn

from dcube.classify.head import DCubeHead
from dcube.classify.losses import cycle_draws, cycle_loss
from dcube.classify.trainer import FeatureSplit, train_classifier
from dcube.config import ClassifierConfig, DiffusionConfig
from dcube.diffusion.schedule import ddpm_scheduler
from dcube.utils.io import read_json


class OracleDenoiser(nn.Module):
    """The exact noise predictor for images that equal one of two class prototypes: under class c
    it predicts (x_t - sqrt(abar_t) proto_c) / sqrt(1 - abar_t), so the true class denoises best; a
    soft label (N, C) conditions on the probability-weighted prototype (as a soft class embedding)."""

    num_classes = 2

    def __init__(self, protos, scheduler):
        super().__init__()
        self.register_buffer("protos", protos)
        self.register_buffer("abar", scheduler.alphas_cumprod.float())

    def forward(self, x, t, y):
        a = self.abar[t].view(-1, 1, 1, 1)
        proto = torch.einsum("nc,c...->n...", y, self.protos) if y.is_floating_point() else self.protos[y]
        return (x - a.sqrt() * proto) / (1 - a).sqrt()


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.stack([torch.linspace(-1, 1, 64).view(1, 8, 8), -torch.linspace(-1, 1, 64).view(1, 8, 8)])
    y = torch.arange(n) % 2
    images = protos[y] + 0.05 * torch.randn(n, 1, 8, 8, generator=g)
    feats = [torch.randn(n, 4, 4, 4, generator=g) + 0.3 * y[:, None, None, None]]
    return protos, FeatureSplit(feats, images, y, [f.flip(-1) for f in feats])


def _score(y, p):
    acc = float(((p[:, 1] > 0.5) == (y == 1)).mean())
    return acc, acc


def _cycle_run(tmp_path, epochs, monkeypatch=None, every=False, channels_last=False):
    import dcube.classify.trainer as trainer
    from dcube.config import ComputeConfig

    sched = ddpm_scheduler(DiffusionConfig())
    protos, train = _data()
    _, val = _data(24, 1)
    if every:
        monkeypatch.setattr(trainer, "ratio_epoch", lambda epoch, epochs: True)
    cfg = ClassifierConfig(subfeature="none", epochs=epochs, batch_size=16, cycle_weight=1.0, consistency_weight=0.1)
    head, _ = train_classifier(cfg, train, val, ["a", "b"], tmp_path, _score, denoiser=OracleDenoiser(protos, sched),
                               scheduler=sched, compute=ComputeConfig(channels_last=channels_last))
    return head, val, read_json(tmp_path / "history.json")["history"]


def test_cycle_loss_has_a_real_share_of_the_gradient_on_a_class_sensitive_denoiser(tmp_path):
    """With a denoiser whose prediction depends on the class, the soft-label cycle loss moves the head:
    its gradient is a measurable share of the cross-entropy's (a term without gradient, as in the
    published code's arg-max form, gives 0)."""
    _, _, rows = _cycle_run(tmp_path, 2)
    assert all(r["cycle_grad_ratio"] > 1e-3 for r in rows), rows
    assert all(r["cycle"] > 0 for r in rows)


def test_cycle_loss_is_zero_at_the_true_label_and_needs_the_denoiser(tmp_path):
    sched = ddpm_scheduler(DiffusionConfig())
    protos, train = _data(8)
    oracle = OracleDenoiser(protos, sched)
    draws = cycle_draws(sched, tuple(train.images.shape), torch.Generator().manual_seed(0))
    right = torch.nn.functional.one_hot(train.labels, 2).float() * 40  # softmax ~ the true one-hot
    assert cycle_loss(oracle, sched, train.images, right, train.labels, draws=draws) < 1e-6
    assert cycle_loss(oracle, sched, train.images, -right, train.labels, draws=draws) > 1e-3
    with pytest.raises(ValueError, match="denoiser"):
        train_classifier(ClassifierConfig(subfeature="none", epochs=1, cycle_weight=1.0),
                         train, train, ["a", "b"], tmp_path, _score)


def test_class_scores_enter_the_head_as_raw_global_sums():
    torch.manual_seed(0)
    head = DCubeHead([4], 2, 1, 8, ClassifierConfig(subfeature="none"), fuse_size=4).eval()
    _, split = _data(6)
    scores = head.class_scores(split.feats, split.images)
    f = head.proj(torch.cat([head.norms[0](split.feats[0])], 1))
    raw = head.class_map(f).sum(dim=(2, 3))
    assert torch.allclose(scores, raw) and not torch.allclose(scores.sum(1), torch.ones(6))  # no softmax


@pytest.mark.parametrize("consistency", [0.0, 0.1])
def test_flip_augmentation_uses_the_flipped_features(tmp_path, consistency):
    _, train = _data()
    _, val = _data(24, 1)
    base = ClassifierConfig(subfeature="none", epochs=1, batch_size=16, cycle_weight=0.0,
                            consistency_weight=consistency, flip_augment=True)
    a, _ = train_classifier(base, train, val, ["a", "b"], tmp_path / "a", _score, consistency_batch=4)
    garbage = FeatureSplit(train.feats, train.images, train.labels, [torch.zeros_like(f) for f in train.feats])
    b, _ = train_classifier(base, garbage, val, ["a", "b"], tmp_path / "b", _score, consistency_batch=4)
    off = ClassifierConfig(**{**vars(base), "flip_augment": False})
    c, _ = train_classifier(off, garbage, val, ["a", "b"], tmp_path / "c", _score, consistency_batch=4)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert not torch.allclose(pa, pb)  # the flipped features reach training...
    no_flip = FeatureSplit(train.feats, train.images, train.labels, None)
    if not consistency:  # without consistency the flipped features are not read at all with flips off
        d, _ = train_classifier(off, no_flip, val, ["a", "b"], tmp_path / "d", _score, consistency_batch=4)
        assert torch.allclose(pc, torch.cat([p.flatten() for p in d.parameters()]))  # ...only with flips on
    with pytest.raises(ValueError, match="flip_augment"):
        train_classifier(base, no_flip, val, ["a", "b"], tmp_path / "e", _score)


def test_gradient_share_is_measured_on_a_sparse_schedule_and_changes_no_weight(tmp_path, monkeypatch):
    from dcube.classify.trainer import ratio_epoch

    assert [e + 1 for e in range(12) if ratio_epoch(e, 12)] == [1, 2, 4, 8, 12]
    head, _, rows = _cycle_run(tmp_path / "sparse", 6)
    assert [r["epoch"] for r in rows if "cycle_grad_ratio" in r] == [1, 2, 4, 6]
    head_every, _, rows_every = _cycle_run(tmp_path / "every", 6, monkeypatch, every=True)
    assert all("cycle_grad_ratio" in r for r in rows_every)
    assert [r["val_auc"] for r in rows] == [r["val_auc"] for r in rows_every]
    for (k, a), b in zip(head.state_dict().items(), head_every.state_dict().values()):
        assert torch.equal(a, b), k  # the two extra backward passes touch no weight


def test_channels_last_step2_is_the_same_arithmetic_and_returns_a_plain_head(tmp_path):
    from dcube.classify.trainer import head_probabilities

    head, val, _ = _cycle_run(tmp_path / "plain", 2)
    head_cl, _, _ = _cycle_run(tmp_path / "cl", 2, channels_last=True)
    convs = [m.weight for m in head_cl.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous() for w in convs)  # evaluated as `dcube predict` loads it
    assert torch.allclose(head_probabilities(head, val), head_probabilities(head_cl, val), atol=1e-4)
