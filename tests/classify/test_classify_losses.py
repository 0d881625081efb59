import pytest
import torch

from dcube.classify.head import DCubeHead
from dcube.classify.losses import consistency_loss, cycle_loss
from dcube.config import ClassifierConfig, DiffusionConfig
from dcube.diffusion import build_denoiser
from dcube.diffusion.schedule import ddpm_scheduler


@pytest.fixture(scope="module")
def frozen():
    torch.manual_seed(0)
    cfg = DiffusionConfig(backbone="unet", preset="micro")
    model = build_denoiser(cfg, 1, 16, 2).eval()
    with torch.no_grad():  # MONAI zero-initialises the output conv: stand in for trained weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
            p.requires_grad_(False)
    return model, ddpm_scheduler(cfg)


def _head(subfeature="none"):
    torch.manual_seed(0)
    return DCubeHead([8, 4], 2, 1, 16, ClassifierConfig(subfeature=subfeature), fuse_size=4)


def _inputs():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(6, 8, 4, 4, generator=g), torch.randn(6, 4, 2, 2, generator=g)]
    return feats, torch.rand(6, 1, 16, 16, generator=g) * 2 - 1, torch.tensor([0, 1, 0, 1, 1, 0])


def test_cycle_loss_changes_head_gradients(frozen):
    model, sched = frozen
    feats, x, y = _inputs()

    def grads(with_cycle):
        head = _head()
        logits = head(feats, x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        if with_cycle:
            loss = loss + cycle_loss(model, sched, x, logits, y, torch.Generator().manual_seed(3))
        loss.backward()
        return torch.cat([p.grad.flatten() for p in head.fc.parameters()])

    g0, g1 = grads(False), grads(True)
    assert not torch.allclose(g0, g1), "the cycle loss must reach the head's parameters"
    assert all(p.grad is None for p in model.parameters()), "the denoiser stays frozen"


def test_cycle_loss_pulls_the_prediction_towards_the_true_class(frozen):
    """Not true by construction: along logits s * (onehot(y) - 1/2) the loss falls as s grows (the
    prediction moves from the wrong class to the right one), and at p = 1/2 a gradient step raises
    the true class's logit for every image."""
    model, sched = frozen
    _, x, y = _inputs()
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    toward = torch.nn.functional.one_hot(y, 2).float() - 0.5
    losses = [float(cycle_loss(model, sched, x, s * toward, y, g())) for s in (-8.0, -2.0, 0.0, 2.0, 8.0)]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert losses[0] > 10 * losses[-1] > 0
    logits = torch.zeros(6, 2, requires_grad=True)
    cycle_loss(model, sched, x, logits, y, g()).backward()
    step = -logits.grad
    rows = torch.arange(6)
    assert (step[rows, y] > step[rows, 1 - y]).all(), step


def test_consistency_loss():
    a = torch.randn(4, 3)
    assert consistency_loss(a, a) == 0
    assert consistency_loss(a, a + 1) == pytest.approx(1.0)


@pytest.mark.parametrize("subfeature", ["none", "resnet18"])
def test_head_shapes_and_gradient(subfeature):
    head = _head(subfeature)
    feats, x, _ = _inputs()
    out = head(feats, x)
    assert out.shape == (6, 2)
    out.sum().backward()
    assert head.to_one.weight.grad is not None
