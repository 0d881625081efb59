"""D-Cube contrastive loss and batch pairing."""

import pytest
import torch

from dcube.diffusion import contrastive_loss, pair_indices


def _feat(n=4, seed=0):
    return torch.randn(n, 8, 3, 3, generator=torch.Generator().manual_seed(seed))


def test_identical_same_class_features_give_zero():
    f = _feat()
    assert contrastive_loss(f, f.clone(), torch.ones(4, dtype=torch.bool), margin=1.0).item() == 0.0


def test_identical_different_class_features_give_margin_squared():
    f = _feat()
    loss = contrastive_loss(f, f.clone(), torch.zeros(4, dtype=torch.bool), margin=1.0)
    assert loss.item() == pytest.approx(1.0, abs=1e-5)


def test_different_class_features_beyond_margin_give_zero():
    f = _feat()
    # opposite directions: distance 2 on the unit sphere > margin 1.5
    assert contrastive_loss(f, -f, torch.zeros(4, dtype=torch.bool), margin=1.5).item() == 0.0
    # ... but the same pair, same-class, is pulled together with d^2 = 4
    assert contrastive_loss(f, -f, torch.ones(4, dtype=torch.bool), margin=1.5).item() == pytest.approx(4.0)


def test_features_are_scale_invariant():
    f1, f2 = _feat(seed=0), _feat(seed=1)
    same = torch.tensor([True, False, True, False])
    a = contrastive_loss(f1, f2, same, margin=1.0)
    b = contrastive_loss(10 * f1, 0.1 * f2, same, margin=1.0)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("same", [True, False])
def test_gradient_step_moves_pairs_the_right_way(same):
    f1 = _feat(seed=0)
    f2 = f1 + 0.3 * _feat(seed=1)  # close pairs, well inside the margin
    f1.requires_grad_(True)
    mask = torch.full((4,), same)
    contrastive_loss(f1, f2, mask, margin=1.0).backward()
    assert torch.isfinite(f1.grad).all()

    def dist(a):
        a = torch.nn.functional.normalize(a.flatten(1), dim=1)
        b = torch.nn.functional.normalize(f2.flatten(1), dim=1)
        return (a - b).norm(dim=1)

    with torch.no_grad():
        before = dist(f1)
        after = dist(f1 - 0.5 * f1.grad)
    if same:
        assert (after < before).all()
    else:
        assert (after > before).all()


def test_gradient_finite_for_identical_different_class_features():
    f = _feat()
    f1 = f.clone().requires_grad_(True)
    contrastive_loss(f1, f.clone(), torch.zeros(4, dtype=torch.bool), margin=1.0).backward()
    assert torch.isfinite(f1.grad).all()


def test_contrastive_loss_checks_shapes_and_handles_empty():
    f = _feat()
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(f, f[:, :4], torch.ones(4, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="same must"):
        contrastive_loss(f, f, torch.ones(3, dtype=torch.bool), 1.0)
    empty = torch.zeros(0, 8, requires_grad=True)
    assert contrastive_loss(empty, empty, torch.zeros(0, dtype=torch.bool), 1.0).item() == 0.0


def test_pair_indices_deterministic_and_mixed():
    labels = torch.arange(64) % 3
    a = pair_indices(labels, torch.Generator().manual_seed(0))
    b = pair_indices(labels, torch.Generator().manual_seed(0))
    c = pair_indices(labels, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.long and a.shape == labels.shape
    assert (a != torch.arange(64)).all()  # nobody is its own partner
    same = labels[a] == labels
    assert 16 <= int(same.sum()) <= 48  # roughly half and half


def test_pair_indices_edge_cases():
    g = torch.Generator().manual_seed(0)
    one_class = torch.zeros(6, dtype=torch.long)
    p = pair_indices(one_class, g)
    assert (p != torch.arange(6)).all()  # same-class partners only
    lonely = torch.tensor([0, 1, 1, 1])  # class 0 alone -> a different-class partner
    for _ in range(5):
        p = pair_indices(lonely, g)
        assert p[0] != 0 and lonely[p[0]] == 1
    assert pair_indices(torch.tensor([2]), g).tolist() == [0]
    assert pair_indices(torch.zeros(0, dtype=torch.long), g).numel() == 0
