"""Light heads on the recommended (layers, t) features, and end-to-end fine-tuning.

* linear probe: scikit-learn logistic regression on standardised pooled features;
* :class:`MLPHead`: standardise -> Linear -> GELU -> Dropout -> Linear, trained with AdamW,
  the epoch with the best validation balanced accuracy kept;
* :class:`FineTuneModel`: denoiser (unfrozen, ``FINETUNE_LR``) + hooks + pooling + the
  MLP head (``HEAD_LR``), trained end to end on x_t with fresh noise every step;
  evaluated, like the features, with a noise fixed per image index.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dcube.features.extract import FeatureExtractor
from dcube.utils.engine import Best, Engine

# settings no study changed (their keys left the config in dcube 1.0); the epochs are options of
# dcube train-latent-head
HEAD_EPOCHS = 60  # the MLP head's epochs (full batch on cached features: cheap)
FINETUNE_EPOCHS = 3  # end-to-end fine-tuning epochs
HEAD_HIDDEN = 128  # the MLP head's hidden units
HEAD_LR = 1e-3  # the head's AdamW learning rate (also while fine-tuning)
HEAD_WEIGHT_DECAY = 1e-4  # AdamW weight decay of the head and of fine-tuning
FINETUNE_LR = 1e-5  # the denoiser's learning rate when fine-tuned end to end
FINETUNE_BATCH_SIZE = 32  # fine-tuning images per optimiser step


def features(model, latents, layers, t, scheduler, seed=0, device="cpu") -> torch.Tensor:
    """(N, D): the pooled features of `layers` at `t`, concatenated in the order given."""
    from dcube.latent.analysis import pooled

    maps = pooled(model, latents, list(layers), t, scheduler, seed, device)
    return torch.cat([maps[n] for n in layers], dim=1)


def fixed_noise(shape, indices, seed: int) -> torch.Tensor:
    """The per-image noise of ``features.extract`` in xt mode (seeded by (seed, image index))."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                        for i in indices])


def linear_probe(x_train, y_train, x_test, seed: int = 0) -> np.ndarray:
    """Class probabilities of the test features under a standardised logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(np.asarray(x_train), np.asarray(y_train))
    return clf.predict_proba(np.asarray(x_test))


class MLPHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def fit_scaler(self, x: torch.Tensor) -> "MLPHead":
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _balanced_acc(y: torch.Tensor, probs: torch.Tensor) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(y.numpy(), probs.argmax(1).numpy()))


def train_mlp_head(x_train, y_train, x_val, y_val, num_classes: int, epochs: int = HEAD_EPOCHS, seed: int = 0,
                   progress: bool = True) -> tuple[MLPHead, dict]:
    """Full-batch AdamW on the cached features; keeps the epoch best on validation."""
    torch.manual_seed(seed)
    head = MLPHead(x_train.shape[1], num_classes, HEAD_HIDDEN).fit_scaler(x_train)
    engine = Engine(head, torch.optim.AdamW(head.parameters(), lr=HEAD_LR, weight_decay=HEAD_WEIGHT_DECAY))
    g = torch.Generator().manual_seed(seed)
    best, history = Best(), []
    for epoch in tqdm(range(epochs), desc="MLP head", disable=not progress, leave=False):
        head.train()
        for idx in torch.randperm(len(x_train), generator=g).split(64):
            loss = F.cross_entropy(head(x_train[idx]), y_train[idx])
            with engine.step():
                engine.backward(loss)
        head.eval()
        with torch.no_grad():
            score = _balanced_acc(y_val, head(x_val).softmax(1))
        history.append({"epoch": epoch + 1, "loss": loss.item(), "val_balanced_accuracy": score})
        best.update(score, head, epoch + 1)
    best.restore(head).eval()
    return head, {"history": history, "best_val_balanced_accuracy": best.score,
                  "best_epoch": max(history, key=lambda h: h["val_balanced_accuracy"])["epoch"]}


class FineTuneModel(nn.Module):
    """Denoiser features at (layers, t) -> pooled -> MLP head, differentiable end to end."""

    def __init__(self, denoiser, head: MLPHead, layers: list[str], t: int, scheduler):
        super().__init__()
        self.denoiser, self.head, self.layers, self.t = denoiser, head, list(layers), int(t)
        self.scheduler = scheduler

    def forward(self, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        t = torch.full((len(z),), self.t, dtype=torch.long, device=z.device)
        y = self.denoiser.uniform_labels(len(z), z.device)  # as in feature extraction
        with FeatureExtractor(self.denoiser, self.layers) as fx:
            self.denoiser(self.scheduler.add_noise(z, noise, t), t, y)
            feats = torch.cat([fx.maps[n].float().mean(dim=(2, 3)) for n in self.layers], dim=1)
        return self.head(feats)

    @torch.no_grad()
    def predict(self, z: torch.Tensor, seed: int = 0, batch_size: int = 128, device="cpu") -> torch.Tensor:
        """Probabilities with the noise fixed per image index (as in feature extraction)."""
        self.eval()
        out = []
        for s in range(0, len(z), batch_size):
            x = z[s:s + batch_size].to(device)
            out.append(self(x, fixed_noise(x.shape[1:], range(s, s + len(x)), seed).to(device)).softmax(1).cpu())
        return torch.cat(out)


def finetune(ft: FineTuneModel, z_train, y_train, z_val, y_val, epochs: int = FINETUNE_EPOCHS, seed: int = 0,
             device="cpu", progress: bool = True, lr: float = FINETUNE_LR, batch_size: int = FINETUNE_BATCH_SIZE) -> dict:
    """Unfreeze the denoiser and train denoiser (at `lr`) + head; keeps the epoch best on validation."""
    ft.to(device)
    for p in ft.parameters():
        p.requires_grad_(True)
    engine = Engine(ft, torch.optim.AdamW([{"params": ft.denoiser.parameters(), "lr": lr},
                                           {"params": ft.head.parameters(), "lr": HEAD_LR}],
                                          weight_decay=HEAD_WEIGHT_DECAY))
    best = Best(_balanced_acc(y_val, ft.predict(z_val, seed, device=device)), ft)  # epoch 0: the head alone
    history = [{"epoch": 0, "val_balanced_accuracy": best.score}]
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(z_train), generator=g)
        ft.train()
        for idx in tqdm(order.split(batch_size), desc=f"fine-tune epoch {epoch + 1}",
                        disable=not progress, leave=False):
            z = z_train[idx].to(device)
            noise = torch.randn(z.shape, generator=g).to(device)
            loss = F.cross_entropy(ft(z, noise), y_train[idx].to(device))
            with engine.step():
                engine.backward(loss)
        score = _balanced_acc(y_val, ft.predict(z_val, seed, device=device))
        history.append({"epoch": epoch + 1, "loss": loss.item(), "val_balanced_accuracy": score})
        best.update(score, ft, epoch + 1)
    best.restore(ft).eval()
    return {"history": history, "best_val_balanced_accuracy": best.score,
            "best_epoch": max(history, key=lambda h: h["val_balanced_accuracy"])["epoch"]}
