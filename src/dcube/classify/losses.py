"""Step-2 losses besides cross-entropy.

posterior_cycle_loss (``classifier.cycle_form: posterior``, dcube's default form): KL divergence
from the frozen denoiser's class posterior to the head's softmax. The posterior is the zero-shot
diffusion classifier's (softmax of negative class-conditional denoising errors over K shared
(t, noise) trials), calibrated on the TRAINING labels (:func:`calibrate_posterior`), computed once
per training image: "the class whose conditioning explains the image", as a soft target. Its
gradient reaches the logits directly, so its weight is on the same scale as the cross-entropy's.

cycle_loss (``cycle_form: soft``, the earlier form): the frozen denoiser predicts the noise of x_t under the classifier's predicted
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


def posterior_cycle_loss(logits: torch.Tensor, posterior: torch.Tensor) -> torch.Tensor:
    """KL(posterior || softmax(logits)), mean over rows."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), posterior.float(), reduction="batchmean")


def calibrate_posterior(errors: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Class probabilities from mean denoising errors (N, C): a multinomial logistic regression on the
    errors relative to each image's mean (scikit-learn), fitted on these (training) labels, and
    returned for the same images; with its in-sample log-loss and that of the class prior."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    x = -(errors - errors.mean(dim=1, keepdim=True)).double().numpy()
    x = x / max(float(x.std()), 1e-12)
    y = labels.numpy()
    lr = LogisticRegression(C=1.0, max_iter=1000).fit(x, y)
    p = lr.predict_proba(x)
    prior = np.bincount(y, minlength=errors.shape[1]) / len(y)
    info = {"log_loss": float(log_loss(y, p, labels=list(range(errors.shape[1])))),
            "prior_log_loss": float(log_loss(y, np.tile(prior, (len(y), 1)), labels=list(range(errors.shape[1])))),
            "zero_shot_accuracy": float((errors.argmin(1).numpy() == y).mean())}
    return torch.from_numpy(p).float(), info


def consistency_loss(logits: torch.Tensor, logits_flipped: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(logits, logits_flipped)
