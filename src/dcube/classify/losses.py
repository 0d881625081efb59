"""Step-2 losses besides cross-entropy.

cycle_loss (``classifier.cycle_weight > 0``; the paper's cycle loss): the frozen denoiser predicts the noise of x_t under the classifier's predicted
class distribution (a *soft* class embedding, so the loss has a gradient w.r.t. the logits
- the published code used the arg-max label and had none) and under the true class; the
MSE between the two pushes the prediction towards a class that explains the image.

consistency_loss: MSE between the logits of an image and of its horizontal flip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cycle_draws(scheduler, shape: tuple, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The timesteps and noise of the cycle loss for a batch of `shape` (on the CPU)."""
    t = torch.randint(0, scheduler.num_train_timesteps, (shape[0],), generator=generator)
    return t, torch.randn(shape, generator=generator)


def cycle_loss(denoiser, scheduler, x0: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator | None = None, draws: tuple | None = None) -> torch.Tensor:
    """`draws`: (t, noise) from :func:`cycle_draws` (a share of a batch drawn once); else drawn
    here from `generator`."""
    t, noise = draws if draws is not None else cycle_draws(scheduler, tuple(x0.shape), generator)
    t, noise = t.to(x0.device), noise.to(x0.device)
    xt = scheduler.add_noise(x0, noise, t)
    with torch.no_grad():
        target = denoiser(xt, t, y)
    pred = denoiser(xt, t, logits.softmax(dim=1))
    return F.mse_loss(pred, target)


def consistency_loss(logits: torch.Tensor, logits_flipped: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(logits, logits_flipped)
