"""Class-conditional UNet denoiser: MONAI ``DiffusionModelUNet`` behind the Denoiser interface.

The MONAI network is built with ``num_class_embeds = num_classes + 1`` (the last row is
the reserved null class) and its ``class_embedding`` is swapped for a
:class:`SoftClassEmbedding` holding the same initial weights, so ``forward`` also takes
class probabilities (N, num_classes) and is differentiable in them.

Feature names (forward order): ``down_0 .. down_{L-1}``, ``mid``, ``up_0 .. up_{L-1}``
with L = len(channels). A MONAI down block returns ``(h, res_samples)``;
:meth:`UNetDenoiser.to_map` keeps ``h`` (after the block's down-sampling, if any).

Image size: every level but the last halves the resolution, so the image size must be
divisible by ``2 ** (len(channels) - 1)`` (4 for the 3-level presets: 28 -> 14 -> 7).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from dcube.diffusion.base import Denoiser
from dcube.diffusion.embedding import SoftClassEmbedding

UNET_PRESETS: dict[str, dict[str, Any]] = {
    "micro": dict(  # for tests: seconds, not minutes
        channels=(8, 16, 16), attention_levels=(False, False, True), num_res_blocks=1,
        num_head_channels=8, norm_num_groups=8,
    ),
    "tiny": dict(
        channels=(32, 64, 64), attention_levels=(False, False, True), num_res_blocks=1,
        num_head_channels=32, norm_num_groups=32,
    ),
    "small": dict(
        channels=(64, 128, 128), attention_levels=(False, True, True), num_res_blocks=2,
        num_head_channels=32, norm_num_groups=32,
    ),
    "base": dict(
        channels=(128, 256, 256), attention_levels=(False, True, True), num_res_blocks=2,
        num_head_channels=64, norm_num_groups=32,
    ),
}


class UNetDenoiser(Denoiser):
    """MONAI DiffusionModelUNet (2D) with a soft class embedding (implements :class:`Denoiser`).

    Args:
        in_channels, image_size, num_classes: data geometry (output has in_channels).
        channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups:
            passed to ``DiffusionModelUNet``.
        preset: name recorded in ``spec`` / ``describe`` (informational).
    """

    backbone = "unet"

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        channels: Sequence[int] = (32, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True),
        num_res_blocks: int | Sequence[int] = 1,
        num_head_channels: int | Sequence[int] = 32,
        norm_num_groups: int = 32,
        preset: Optional[str] = None,
    ):
        super().__init__(in_channels, image_size, num_classes, preset)
        channels = tuple(int(c) for c in channels)
        attention_levels = tuple(bool(a) for a in attention_levels)
        self.downsample_factor = 2 ** (len(channels) - 1)
        if image_size % self.downsample_factor:
            raise ValueError(
                f"image_size={image_size} is not divisible by {self.downsample_factor} = "
                f"2**(len(channels) - 1) for a {len(channels)}-level UNet "
                f"(choose data.image_size divisible by {self.downsample_factor}, e.g. 28, 32 or 64)"
            )
        self.spec = dict(
            backbone=self.backbone, preset=preset, in_channels=in_channels, image_size=image_size,
            num_classes=num_classes, channels=list(channels), attention_levels=list(attention_levels),
            num_res_blocks=num_res_blocks if isinstance(num_res_blocks, int) else list(num_res_blocks),
            num_head_channels=num_head_channels if isinstance(num_head_channels, int) else list(num_head_channels),
            norm_num_groups=norm_num_groups,
        )
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=in_channels,
            num_res_blocks=num_res_blocks,
            channels=channels,
            attention_levels=attention_levels,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            num_class_embeds=num_classes + 1,
            use_flash_attention=True,  # torch scaled_dot_product_attention (CPU and GPU)
        )
        self.unet.class_embedding = SoftClassEmbedding.from_embedding(
            self.unet.class_embedding, num_classes=num_classes
        )
        n = len(channels)
        self.feature_names = [f"down_{i}" for i in range(n)] + ["mid"] + [f"up_{i}" for i in range(n)]
        self.mid_name = "mid"

    @property
    def class_embedding(self) -> SoftClassEmbedding:  # type: ignore[override]
        return self.unet.class_embedding  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t, y = self._prepare(x, t, y)
        h, w = x.shape[-2:]
        if h % self.downsample_factor or w % self.downsample_factor:
            raise ValueError(
                f"x has spatial size {(h, w)}; this UNet needs sizes divisible by "
                f"{self.downsample_factor} (image_size={self.image_size})"
            )
        return self.unet(x, timesteps=t, class_labels=y)

    def feature_modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {f"down_{i}": b for i, b in enumerate(self.unet.down_blocks)}
        mods["mid"] = self.unet.middle_block
        mods.update({f"up_{i}": b for i, b in enumerate(self.unet.up_blocks)})
        return mods

    def to_map(self, name: str, output: Any) -> torch.Tensor:
        """Down blocks give (h, res_samples) -> h; mid/up blocks give h. Shape (N, C, h, w)."""
        self._check_name(name)
        if isinstance(output, (tuple, list)):
            output = output[0]
        return output
