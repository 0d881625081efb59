"""Class embedding that accepts hard class ids or soft class probabilities.

D-Cube conditions the denoiser on a class. At training time the condition is a hard
label (an int64 id). When the classifier is trained (step 2), its predicted class
probabilities are fed back into the *frozen* denoiser (the cycle loss); for that the
class embedding must be a differentiable function of the probabilities:

    emb(p) = p @ E[:K]            (p: (N, K) float, E: the embedding table)

which equals the ordinary lookup ``E[y]`` when ``p`` is the one-hot vector of ``y``.

The table has ``num_classes + 1`` rows: the last row (``null_index == num_classes``) is
reserved for a "null" class (classifier-free guidance: train with labels randomly
replaced by ``null_index``; sample with a mix of conditional and null predictions).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class SoftClassEmbedding(nn.Embedding):
    """``nn.Embedding`` whose forward also takes class probabilities.

    Args:
        num_embeddings: rows of the table. Use :meth:`for_classes` to get
            ``num_classes + 1`` rows (the extra row is the null class).
        embedding_dim: width of an embedding.
        num_classes: the number of real classes (default ``num_embeddings - 1``);
            ``null_index == num_classes``.

    forward(y):
        * ``y`` integer, shape (N,): the usual lookup ``weight[y]``.
        * ``y`` floating, shape (N, K) with ``K <= num_embeddings``: ``y @ weight[:K]``
          (differentiable in ``y``; K = num_classes for class probabilities, or
          num_classes + 1 to also put mass on the null class).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        num_classes: Optional[int] = None,
        **kwargs,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        if num_classes is None:
            num_classes = num_embeddings - 1
        if not 1 <= num_classes <= num_embeddings:
            raise ValueError(
                f"num_classes: must lie in [1, num_embeddings={num_embeddings}], got {num_classes}"
            )
        self.num_classes = int(num_classes)

    @classmethod
    def for_classes(cls, num_classes: int, embedding_dim: int) -> "SoftClassEmbedding":
        """A table with ``num_classes`` real rows plus one null row."""
        if num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
        return cls(num_classes + 1, embedding_dim, num_classes=num_classes)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, num_classes: Optional[int] = None) -> "SoftClassEmbedding":
        """A copy of an existing ``nn.Embedding`` (same weights) as a SoftClassEmbedding."""
        new = cls(emb.num_embeddings, emb.embedding_dim, num_classes=num_classes)
        new = new.to(device=emb.weight.device, dtype=emb.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(emb.weight)
        return new

    @property
    def null_index(self) -> int:
        """Row of the reserved null class (classifier-free guidance)."""
        return self.num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if y.is_floating_point():
            if y.ndim != 2:
                raise ValueError(
                    f"soft class labels must have shape (N, K), got shape {tuple(y.shape)}"
                )
            k = y.shape[1]
            if not 1 <= k <= self.num_embeddings:
                raise ValueError(
                    f"soft class labels have K={k} columns; expected 1..{self.num_embeddings} "
                    f"(num_classes={self.num_classes}, plus 1 null class)"
                )
            return y.to(self.weight.dtype) @ self.weight[:k]
        if y.ndim != 1:
            raise ValueError(
                f"hard class labels must be integer ids of shape (N,), got shape {tuple(y.shape)}"
            )
        return super().forward(y.long())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_classes={self.num_classes}, null_index={self.null_index}"
