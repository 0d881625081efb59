"""Zero-shot diffusion classifier (Li et al. 2023, "Your diffusion model is secretly a zero-shot
classifier"; the ISBI 2025 latent-diffusion X-ray classifier).

For an image (its latent ``z``, or the image itself for a pixel-space model) and K trials
``(t_k, eps_k)`` -- the same for every class and every image (variance reduction) -- the
class-conditional denoising error is

    e_ck = || eps_theta(sqrt(abar_t) z + sqrt(1 - abar_t) eps_k, t_k, c) - eps_k ||^2

(summed over the latent's elements, the ELBO approximation), averaged over k with weights w_k.
Scores are ``softmax(-E_c / temperature)``; the prediction is the class with the smallest error.

Adaptive mode (:class:`Adaptive`; ``dcube classify-zero-shot --adaptive``): after ``first_round`` trials a
class whose paired error excess over the best class exceeds ``drop_z`` standard errors is dropped; only the survivors get the remaining
trials (an image left with one class stops). A dropped class keeps the score it earned in the
first round, expressed relative to the reference class: E_c = E_ref + mean(e_c - e_ref) over
the trials both saw, so every class's score stays comparable.

All (image, class, trial) inputs are evaluated in flat batches of ``batch_size``, the
classes of an image next to each other (one forward pass). Deterministic for a seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from dcube.utils import dist

WEIGHTINGS = ("uniform", "min_snr")


@dataclass
class ZeroShotOptions:
    """How the trials are drawn and weighed: the options of ``dcube classify-zero-shot``."""

    trials: int = 16  # K (t, noise) pairs per image, shared by all classes
    timesteps: Optional[list] = None  # explicit t set (cycled over the K trials); None = evenly spaced
    t_min: int = 50  # smallest timestep of the evenly spaced ones
    t_max: int = 950  # largest timestep of the evenly spaced ones
    weighting: str = "uniform"  # uniform | min_snr
    temperature: float = 1.0  # scores = softmax(-mean error / temperature)
    batch_size: int = 256  # denoiser inputs per forward pass (images x classes x trials)


@dataclass
class Adaptive:
    """Adaptive class dropping: a command's option, not the model's (``dcube classify-zero-shot --adaptive``)."""

    first_round: int = 4  # trials every class gets before the clearly worse ones are dropped
    drop_z: float = 2.0  # drop a class when its paired error excess exceeds this many standard errors


def as_adaptive(adaptive: "Adaptive | bool | None") -> "Adaptive | None":
    """An Adaptive (True: its defaults) or None (None or False: every class gets every trial)."""
    return Adaptive() if adaptive is True else (adaptive or None)


FIRST_ROUND = Adaptive().first_round  # also the trial order's stride (any prefix spreads over the t range)


@dataclass
class Trials:
    t: torch.Tensor  # int64 (K,)
    noise: torch.Tensor  # (K, C, h, w)
    weight: torch.Tensor  # (K,), mean 1


def check_options(opts: ZeroShotOptions, num_train_timesteps: int, adaptive: Adaptive | None = None) -> None:
    """Raise ValueError naming the option that is out of range."""
    if opts.trials < 1:
        raise ValueError(f"--trials: must be >= 1, got {opts.trials}")
    if opts.weighting not in WEIGHTINGS:
        raise ValueError(f"--weighting: {opts.weighting!r} is not one of {list(WEIGHTINGS)}")
    if opts.temperature <= 0:
        raise ValueError(f"--temperature: must be > 0, got {opts.temperature}")
    ts = opts.timesteps if opts.timesteps else [opts.t_min, opts.t_max]
    if not ts or not all(isinstance(t, int) and 0 <= t < num_train_timesteps for t in ts):
        raise ValueError(f"--timesteps / --t-min / --t-max: every t must be an integer in "
                         f"[0, {num_train_timesteps}), got {ts}")
    if opts.t_min > opts.t_max:
        raise ValueError(f"--t-min {opts.t_min} exceeds --t-max {opts.t_max}")
    if adaptive is not None and not 2 <= adaptive.first_round <= opts.trials:
        raise ValueError(f"--first-round: must lie in [2, --trials {opts.trials}] in adaptive mode, "
                         f"got {adaptive.first_round}")
    if opts.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {opts.batch_size}")


def spread_order(k: int, first: int) -> list[int]:
    """An order of range(k) whose first `first` items spread over the whole range."""
    stride = max(1, -(-k // max(first, 1)))
    return sorted(range(k), key=lambda i: (i % stride, i))


def make_trials(opts: ZeroShotOptions, shape: tuple[int, ...], alphas_cumprod: torch.Tensor, seed: int = 0) -> Trials:
    """The K shared (t, noise) pairs, ordered so that any prefix covers the t range."""
    k = opts.trials
    if opts.timesteps:
        t = torch.tensor([opts.timesteps[i % len(opts.timesteps)] for i in range(k)], dtype=torch.long)
    else:
        t = torch.linspace(opts.t_min, opts.t_max, k).round().long()
    t = t[spread_order(k, FIRST_ROUND)]
    noise = torch.randn((k, *shape), generator=torch.Generator().manual_seed(seed * 7_919 + 17))
    if opts.weighting == "min_snr":
        ab = alphas_cumprod[t].double()
        w = torch.clamp(ab / (1 - ab), max=5.0).float()
    else:
        w = torch.ones(k)
    return Trials(t, noise, w / w.mean())


def class_errors(model, scheduler, z: torch.Tensor, trials: Trials, img: torch.Tensor, cls: torch.Tensor,
                 tri: torch.Tensor, batch_size: int, device="cpu", bar=None) -> torch.Tensor:
    """Squared-norm denoising error of every (image, class, trial) triple; float32 (len(img),).

    Several processes: every world-th batch of triples here, all errors gathered in order."""
    out = []
    for b in range(dist.rank(), -(-len(img) // batch_size), dist.world_size()):
        s = b * batch_size
        i, c, k = img[s:s + batch_size], cls[s:s + batch_size], tri[s:s + batch_size]
        x0 = z[i].to(device)
        noise = trials.noise[k].to(device)
        t = trials.t[k].to(device)
        eps = model(scheduler.add_noise(x0, noise, t), t, c.to(device))
        out.append((eps.float() - noise).pow(2).flatten(1).sum(1).cpu())
        if bar is not None:
            bar.update(len(i) * dist.world_size())
    return dist.gather_ordered(torch.cat(out) if out else torch.zeros(0), len(img), block=batch_size)


def _triples(images: torch.Tensor, classes: torch.Tensor, trials: list[int]):
    """Flat (image, class, trial) indices, image-major, classes of one trial adjacent."""
    rows = [(i, c, k) for i, cs in zip(images.tolist(), classes) for k in trials for c in cs]
    if not rows:
        return (torch.zeros(0, dtype=torch.long),) * 3
    a = torch.tensor(rows, dtype=torch.long)
    return a[:, 0], a[:, 1], a[:, 2]


def combine(errors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean errors (N, C) from per-trial errors (N, C, K) with NaN where a trial was skipped.

    Reference class r per image: most trials seen, then the smallest mean error;
    E_c = wmean_{S_r}(e_r) + wmean_{S_c and S_r}(e_c - e_r).
    """
    seen = ~torch.isnan(errors)
    w = weight  # (K,): broadcasts over the last dimension

    def wmean(x, m):
        m = m.float() * w
        return (torch.nan_to_num(x) * m).sum(-1) / m.sum(-1).clamp_min(1e-12)

    own = wmean(errors, seen)  # (N, C)
    count = seen.sum(-1).float()
    ref = (count * 1e6 - own / (own.abs().max() + 1)).argmax(1)  # most trials, then smallest error
    ar = torch.arange(len(errors))
    e_ref = errors[ar, ref]  # (N, K)
    s_ref = seen[ar, ref]
    base = wmean(e_ref, s_ref)  # (N,)
    diff = wmean(errors - e_ref[:, None], seen & s_ref[:, None])
    return base[:, None] + diff


@dataclass
class ZeroShotResult:
    probs: torch.Tensor  # (N, C) softmax(-errors / temperature)
    errors: torch.Tensor  # (N, C) mean denoising errors
    trial_errors: torch.Tensor  # (N, C, K), NaN where skipped (adaptive)
    evaluations: int  # denoiser inputs evaluated
    seconds: float

    @property
    def images_per_s(self) -> float:
        return len(self.probs) / max(self.seconds, 1e-9)

    @property
    def pred(self) -> torch.Tensor:
        return self.probs.argmax(1)


@torch.no_grad()
def classify_zero_shot(model, scheduler, latents: torch.Tensor, opts: ZeroShotOptions, seed: int = 0,
                       device="cpu", adaptive: Adaptive | bool | None = None, progress: bool = True) -> ZeroShotResult:
    """Zero-shot class scores of `latents` (N, C, h, w) -- scaled latents, or images for a
    pixel-space model -- under the class-conditional denoiser `model`. `adaptive`: an :class:`Adaptive`
    (True: its defaults); None or False: every class gets every trial."""
    adaptive = as_adaptive(adaptive)
    check_options(opts, len(scheduler.alphas_cumprod), adaptive)
    model.eval()
    n, nc, k = len(latents), model.num_classes, opts.trials
    trials = make_trials(opts, tuple(latents.shape[1:]), scheduler.alphas_cumprod, seed)
    errors = torch.full((n, nc, k), float("nan"))
    all_classes = [list(range(nc))] * n
    first = adaptive.first_round if adaptive else k
    t0 = time.time()
    bar = tqdm(total=n * nc * k, desc="zero-shot" + (" (adaptive)" if adaptive else ""), unit="eval",
               disable=not (progress and dist.is_main()), leave=False)
    evaluations = 0

    def run(images, classes, trial_ids):
        nonlocal evaluations
        i, c, kk = _triples(images, classes, trial_ids)
        errors[i, c, kk] = class_errors(model, scheduler, latents, trials, i, c, kk, opts.batch_size, device, bar)
        evaluations += len(i)

    run(torch.arange(n), all_classes, list(range(first)))
    if first < k:
        mean1 = combine(errors[:, :, :first], trials.weight[:first])
        best = mean1.argmin(1)
        d = errors[:, :, :first] - errors[torch.arange(n), best, :first][:, None]
        se = d.std(-1).clamp_min(1e-12) / first ** 0.5
        keep = ~((d.mean(-1) > adaptive.drop_z * se) & (d.mean(-1) > 0))
        keep[torch.arange(n), best] = True
        alive = [torch.nonzero(row).flatten().tolist() for row in keep]
        todo = torch.tensor([i for i, a in enumerate(alive) if len(a) > 1], dtype=torch.long)
        bar.total = evaluations + sum(len(alive[i]) for i in todo.tolist()) * (k - first)
        bar.refresh()
        run(todo, [alive[i] for i in todo.tolist()], list(range(first, k)))
    bar.close()
    mean = combine(errors, trials.weight)
    probs = torch.softmax(-mean.double() / opts.temperature, dim=1).float()
    return ZeroShotResult(probs, mean, errors, evaluations, time.time() - t0)
