"""The D-Cube head.

Selected diffusion feature maps (each batch-normalised, resized to ``FUSE_SIZE`` with antialiasing
when shrunk) and the sub-feature map of an ImageNet-pretrained CNN are projected, concatenated and
fused into ONE channel by a 1x1 convolution. Per-class scores from global sum pooling of a 1x1
class-evidence map on the CNN features weight that channel into one map per class
(x + x * score_c, the raw global sums as in the paper and its code). Three stages of parallel 3x3 and 5x5 convolutions (summed, ReLU,
batch norm; no pooling: C -> 64 -> 32 -> 4 channels) and two fully connected layers
give the logits.

With no diffusion feature maps (``classifier.diffusion_features: false``, the control arm) the same
head runs on the sub-feature CNN alone: the fused channel comes from the CNN's projection only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcube.config import ClassifierConfig

FUSE_SIZE = 16  # spatial size the features are fused at (the official code's)


class ParallelConv(nn.Module):
    """3x3 and 5x5 convolutions side by side, summed, then ReLU and batch norm."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.c3 = nn.Conv2d(cin, cout, 3, padding=1)
        self.c5 = nn.Conv2d(cin, cout, 5, padding=2)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.norm(F.relu(self.c3(x)) + F.relu(self.c5(x)))


class DCubeHead(nn.Module):
    def __init__(self, feat_channels: list[int], num_classes: int, in_channels: int, image_size: int,
                 cfg: ClassifierConfig, width: int = 128, fuse_size: int = FUSE_SIZE):
        super().__init__()
        from dcube.classify.subfeatures import build_subfeature_cnn

        self.size = fuse_size
        self.num_classes = num_classes
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in feat_channels)
        self.proj = nn.Conv2d(sum(feat_channels), width, 1) if feat_channels else None
        if self.proj is None and cfg.subfeature == "none":
            raise ValueError("the head needs diffusion feature maps or a sub-feature CNN (classifier.subfeature)")
        self.cnn = None
        fused_in = width if feat_channels else 0
        if cfg.subfeature != "none":
            self.cnn = build_subfeature_cnn(cfg.subfeature, in_channels, image_size, cfg.subfeature_weights)
            self.cnn_proj = nn.Conv2d(self.cnn.out_channels, width, 1)
            self.class_map = nn.Conv2d(self.cnn.out_channels, num_classes, 1)
            fused_in += width
        else:
            self.class_map = nn.Conv2d(width, num_classes, 1)
        self.to_one = nn.Conv2d(fused_in, 1, 1)
        self.stages = nn.Sequential(ParallelConv(num_classes, 64), ParallelConv(64, 32), ParallelConv(32, 4))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * self.size * self.size, 32), nn.ReLU(),
                                nn.Dropout(0.5), nn.Linear(32, num_classes))

    def _resize(self, x):
        if x.shape[-1] == self.size and x.shape[-2] == self.size:
            return x
        shrink = x.shape[-1] > self.size or x.shape[-2] > self.size
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=shrink)

    def class_scores(self, feats: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """The per-class weights that enter the fused channel (N, num_classes)."""
        return self._fused(feats, image)[1]

    def _fused(self, feats, image):
        if len(feats) != len(self.norms):
            raise ValueError(f"the head was built for {len(self.norms)} diffusion feature maps, got {len(feats)}")
        f = None
        if self.proj is not None:
            f = self.proj(torch.cat([self._resize(n(x)) for n, x in zip(self.norms, feats)], dim=1))
        if self.cnn is not None:
            g = self._resize(self.cnn(image))
            score = self.class_map(g).sum(dim=(2, 3))  # global sum pooling -> per-class score
            f = self.cnn_proj(g) if f is None else torch.cat([f, self.cnn_proj(g)], dim=1)
        else:
            score = self.class_map(f).sum(dim=(2, 3))
        return f, score

    def forward(self, feats: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        f, score = self._fused(feats, image)
        x = self.to_one(f)  # (N, 1, S, S)
        x = x + x * score[:, :, None, None]  # (N, C, S, S)
        return self.fc(self.stages(x))
