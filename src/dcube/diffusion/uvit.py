"""U-ViT: a Vision-Transformer noise predictor with long skip connections.

Everything is a token (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion
Models", 2023):

    image (N, C, H, W) --conv patch embed--> (N, L, D)       L = (H / p) * (W / p)
    tokens = [time token, class token, patch tokens] + learned positional embedding
    in-blocks  (depth // 2 transformer blocks; each output is kept as a skip)
    mid-block  (1 transformer block)
    out-blocks (depth // 2; block i first maps concat(x, skip_i) -> Linear -> D,
                skips are used in reverse order, like a U-Net)
    final LayerNorm -> Linear(D, p*p*C) on patch tokens -> unpatchify -> 3x3 conv

Feature names (in forward order): ``in_0 .. in_{k-1}``, ``mid``, ``out_0 .. out_{k-1}``
with ``k = depth // 2``. A hooked block outputs (N, 2 + L, D) tokens; :meth:`UViT.to_map`
drops the time/class tokens and reshapes to a (N, D, H/p, W/p) map.

Patch-size rule (``patch_size=None``, which every preset uses): the smallest
p in (2, 4, 8, 16) that divides the image size and gives a grid of at most 16 x 16
tokens; if none gives <= 16, the largest of them that divides the image size
(28 px -> p = 2, 14 x 14 tokens; 32 -> 2; 64 -> 4; 128 -> 8; 224 -> 16). An image size
that no candidate divides (e.g. an odd size) raises ValueError naming ``image_size``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dcube.diffusion.base import Denoiser
from dcube.diffusion.embedding import SoftClassEmbedding

# name -> hyper-parameters. depth must be odd: depth // 2 in-blocks, 1 mid, depth // 2 out.
UVIT_PRESETS: dict[str, dict[str, Any]] = {
    "micro": dict(embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, patch_size=None),  # tests
    "tiny": dict(embed_dim=128, depth=7, num_heads=4, mlp_ratio=4.0, patch_size=None),
    "small": dict(embed_dim=256, depth=11, num_heads=4, mlp_ratio=4.0, patch_size=None),
    "base": dict(embed_dim=512, depth=13, num_heads=8, mlp_ratio=4.0, patch_size=None),
}

PATCH_CANDIDATES = (2, 4, 8, 16)
MAX_GRID = 16


def auto_patch_size(image_size: int) -> int:
    """The patch size a preset uses for ``image_size`` (see the module docstring)."""
    dividing = [p for p in PATCH_CANDIDATES if image_size % p == 0 and image_size // p >= 1]
    if not dividing:
        raise ValueError(
            f"image_size={image_size}: U-ViT needs an image size divisible by one of the patch "
            f"sizes {list(PATCH_CANDIDATES)} (set data.image_size to e.g. 28, 32 or 64)"
        )
    for p in dividing:
        if image_size // p <= MAX_GRID:
            return p
    return dividing[-1]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim): [cos(t * f_i), sin(t * f_i)], f_i geometric."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Attention(nn.Module):
    """Multi-head self-attention with torch's scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "n l (three h d) -> three n h l d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "n h l d -> n l (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; with ``skip=True`` it first fuses a long skip.

    forward(x, skip=None): if the block has a skip input, x <- Linear(concat(x, skip)).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this out-block needs its skip input")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(Denoiser):
    """Class-conditional U-ViT noise predictor (implements :class:`Denoiser`).

    Args:
        in_channels, image_size, num_classes: data geometry (output has in_channels).
        embed_dim, depth, num_heads, mlp_ratio: transformer size (depth odd, >= 1).
        patch_size: patch side; None = :func:`auto_patch_size` (image_size).
        preset: name recorded in ``spec`` / ``describe`` (informational).
    """

    backbone = "uvit"
    num_extra_tokens = 2  # time token, class token

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        embed_dim: int = 128,
        depth: int = 7,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        patch_size: Optional[int] = None,
        preset: Optional[str] = None,
    ):
        super().__init__(in_channels, image_size, num_classes, preset)
        if patch_size is None:
            patch_size = auto_patch_size(image_size)
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} is not divisible by patch_size={patch_size} "
                f"(U-ViT needs data.image_size % patch_size == 0)"
            )
        if depth < 1 or depth % 2 == 0:
            raise ValueError(f"depth: must be odd (in-blocks + 1 mid + out-blocks), got {depth}")
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.embed_dim = embed_dim
        num_patches = self.grid * self.grid
        half = depth // 2
        self.spec = dict(
            backbone=self.backbone, preset=preset, in_channels=in_channels, image_size=image_size,
            num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, patch_size=patch_size,
        )

        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.time_embed = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim)
        )
        self.class_embedding = SoftClassEmbedding.for_classes(num_classes, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_extra_tokens + num_patches, embed_dim))

        self.in_blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(half))
        self.mid_block = Block(embed_dim, num_heads, mlp_ratio)
        self.out_blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, skip=True) for _ in range(half))

        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size * patch_size * in_channels)
        self.final_conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)

        self.feature_names = [f"in_{i}" for i in range(half)] + ["mid"] + [f"out_{i}" for i in range(half)]
        self.mid_name = "mid"
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t, y = self._prepare(x, t, y)
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"x has spatial size {tuple(x.shape[-2:])}; this U-ViT was built for "
                f"image_size={self.image_size}"
            )
        tokens = rearrange(self.patch_embed(x), "n d h w -> n (h w) d")
        t_tok = self.time_embed(timestep_embedding(t, self.embed_dim).to(tokens.dtype))
        c_tok = self.class_embedding(y).to(tokens.dtype)
        h = torch.cat([t_tok[:, None], c_tok[:, None], tokens], dim=1) + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            h = blk(h)
            skips.append(h)
        h = self.mid_block(h)
        for blk in self.out_blocks:
            h = blk(h, skips.pop())

        h = self.decoder_pred(self.norm(h))[:, self.num_extra_tokens:]
        p = self.patch_size
        img = rearrange(h, "n (gh gw) (p1 p2 c) -> n c (gh p1) (gw p2)", gh=self.grid, p1=p, p2=p)
        return self.final_conv(img)

    def feature_modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {f"in_{i}": b for i, b in enumerate(self.in_blocks)}
        mods["mid"] = self.mid_block
        mods.update({f"out_{i}": b for i, b in enumerate(self.out_blocks)})
        return mods

    def to_map(self, name: str, output: Any) -> torch.Tensor:
        """(N, 2 + L, D) block tokens -> (N, D, H/p, W/p): drop time/class tokens, reshape."""
        self._check_name(name)
        if isinstance(output, (tuple, list)):
            output = output[0]
        patches = output[:, self.num_extra_tokens:]
        return rearrange(patches, "n (gh gw) d -> n d gh gw", gh=self.grid)
