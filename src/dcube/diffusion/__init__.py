"""Class-conditional denoisers (step 1 of D-Cube) and the contrastive loss.

Backbones (``DiffusionConfig.backbone``) and their size presets (``DiffusionConfig.preset``):

* ``unet`` -- MONAI ``DiffusionModelUNet`` with a soft class embedding (:mod:`.unet`).
* ``uvit`` -- a U-ViT written here (:mod:`.uvit`).

``PRESETS[backbone][preset]`` holds the hyper-parameters. Build with
:func:`build_denoiser`; every model implements :class:`Denoiser` (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from typing import Any

from dcube.diffusion.base import Denoiser, count_parameters
from dcube.diffusion.embedding import SoftClassEmbedding
from dcube.diffusion.losses import contrastive_loss, pair_indices
from dcube.diffusion.unet import UNET_PRESETS, UNetDenoiser
from dcube.diffusion.uvit import UVIT_PRESETS, UViT, auto_patch_size

PRESETS: dict[str, dict[str, dict[str, Any]]] = {"unet": UNET_PRESETS, "uvit": UVIT_PRESETS}
_CLASSES = {"unet": UNetDenoiser, "uvit": UViT}

__all__ = [
    "Denoiser",
    "PRESETS",
    "SoftClassEmbedding",
    "UNetDenoiser",
    "UViT",
    "auto_patch_size",
    "build_denoiser",
    "build_from_spec",
    "contrastive_loss",
    "count_parameters",
    "describe",
    "pair_indices",
]


def build_denoiser(cfg, in_channels: int, image_size: int, num_classes: int) -> Denoiser:
    """Build the denoiser named by ``cfg.backbone`` / ``cfg.preset`` (a DiffusionConfig).

    Raises ValueError naming ``diffusion.backbone`` / ``diffusion.preset`` for an unknown
    choice (listing the valid ones), or naming ``image_size`` when the size does not fit
    the backbone (U-ViT: divisible by the patch size; UNet: by 2**(levels-1)).
    """
    backbone, preset = cfg.backbone, cfg.preset
    if backbone not in PRESETS:
        raise ValueError(f"diffusion.backbone: {backbone!r} is not one of {sorted(PRESETS)}")
    if preset not in PRESETS[backbone]:
        raise ValueError(
            f"diffusion.preset: {preset!r} is not a {backbone} preset; "
            f"valid presets: {list(PRESETS[backbone])}"
        )
    kwargs = dict(PRESETS[backbone][preset])
    return _CLASSES[backbone](in_channels, image_size, num_classes, preset=preset, **kwargs)


def build_from_spec(spec: dict) -> Denoiser:
    """Rebuild a model from its ``model.spec`` dict (e.g. stored next to a checkpoint)."""
    spec = dict(spec)
    backbone = spec.pop("backbone")
    if backbone not in _CLASSES:
        raise ValueError(f"spec backbone {backbone!r} is not one of {sorted(_CLASSES)}")
    return _CLASSES[backbone](**spec)


def describe(model: Denoiser) -> dict:
    """JSON-able summary: backbone, preset, parameter count, sizes and hyper-parameters."""
    info = dict(model.spec)
    info["params"] = count_parameters(model)
    info["feature_names"] = list(model.feature_names)
    info["mid_name"] = model.mid_name
    return info
