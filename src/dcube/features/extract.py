"""Forward hooks on every block of the frozen denoiser.

The denoiser sees either the clean image x0 or x_t noised with a noise draw fixed per
image index and seed, always at the same timestep, and a uniform soft class embedding
(the label is unknown at test time). Train and test features are therefore computed
the same deterministic way.

With several processes each rank computes every world-th batch and the maps are gathered in
the original order (:func:`dcube.utils.dist.gather_ordered`): every rank returns the same maps,
equal to the single-process ones (the batches are the same).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dcube.config import FeatureConfig
from dcube.utils import dist
from dcube.utils.rows import batches


def shrink_map(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """`x` (N, C, h, w) resized (bilinear, antialiased) to size x size when a side is larger; else as is.
    ``features.map_size``: the head fuses at ``dcube.classify.head.FUSE_SIZE`` anyway, so maps stored at that size
    lose nothing it uses and take (h / size)^2 less room (a 128x128 map: 64x less at 16)."""
    if size is None or (x.shape[-1] <= size and x.shape[-2] <= size):
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class FeatureExtractor:
    """Context manager: registers hooks on `names`, collects `model.to_map` outputs (shrunk to `size`)."""

    def __init__(self, model, names: list[str], size: int | None = None):
        unknown = [n for n in names if n not in model.feature_names]
        if unknown:
            raise KeyError(f"unknown layer(s) {unknown}; this model has {model.feature_names}")
        self.model, self.names, self.maps, self.size = model, list(names), {}, size
        self.handles = []

    def __enter__(self):
        mods = self.model.feature_modules()
        for name in self.names:
            self.handles.append(mods[name].register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name):
        def hook(module, inputs, output):
            self.maps[name] = shrink_map(self.model.to_map(name, output), self.size)
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def denoiser_inputs(model, x: torch.Tensor, cfg: FeatureConfig, index: torch.Tensor, seed: int,
                    scheduler=None):
    """(x_in, t, y) for the feature forward pass; noise depends only on (seed, image index)."""
    n = x.shape[0]
    t = torch.full((n,), cfg.timestep, dtype=torch.long, device=x.device)
    y = torch.full((n, model.num_classes), 1.0 / model.num_classes, device=x.device)
    if cfg.input_mode == "xt":
        noise = torch.stack([
            torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
            for i in index
        ]).to(x.device)
        x = scheduler.add_noise(x, noise, t)
    return x, t, y


@torch.no_grad()
def extract(model, images: torch.Tensor, names: list[str], cfg: FeatureConfig, seed: int = 0,
            scheduler=None, device="cpu", dtype=torch.float32, desc: str = "features",
            progress: bool = True, noise_index: torch.Tensor | None = None, sink=None,
            workers: int = 0, size: int | None = None, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Feature maps of `names` for every image: name -> (N, C, h, w) on the CPU. In ``xt`` mode image i
    is noised with the draw of index ``noise_index[i]`` (default: i, its row in the split).

    `images` may be a tensor or an on-disk split (:mod:`dcube.utils.rows`), read batch by batch (ahead,
    in `workers` DataLoader processes). With `sink` (a :class:`dcube.features.cache.FeatureWriter`)
    each batch's maps go straight to disk and {} is returned: memory stays one batch. `size`: maps with a
    side above it are resized to size x size (:func:`shrink_map`; the head's input, ``features.map_size``).
    `batch_size`: images per forward pass (memory, not results)."""
    if cfg.input_mode == "xt" and scheduler is None:
        raise ValueError("features.input_mode='xt' needs the diffusion scheduler")
    model.eval()
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    bs = batch_size
    mine = dist.shard_indices(len(images), block=bs)  # every world-th batch; all of them in one process
    one = dist.world_size() == 1
    starts = list(range(0, len(mine), bs))
    stream = sink is not None and one
    index = [slice(s, s + bs) if one else mine[s:s + bs] for s in starts]
    with FeatureExtractor(model, names, size) as fx:
        for s, x in tqdm(zip(starts, batches(images, index, workers)), total=len(starts), desc=desc,
                         disable=not (progress and dist.is_main()), leave=False):
            idx = mine[s:s + bs]
            model(*denoiser_inputs(model, x.to(device), cfg, idx if noise_index is None else noise_index[idx], seed,
                                   scheduler))
            if stream:
                sink.write(s, {n: fx.maps[n].detach().to("cpu", dtype) for n in names})
            else:
                for n in names:
                    out[n].append(fx.maps[n].detach().to("cpu", dtype))
    if stream:
        if not starts:
            sink.write(0, _empty_maps(model, images, names, cfg, seed, scheduler, device, dtype, size))
        return {}
    if not mine.numel() and dist.world_size() > 1:  # a rank with no batch still joins the gather
        out = {n: [m] for n, m in _empty_maps(model, images, names, cfg, seed, scheduler, device, dtype, size).items()}
    full = {n: dist.gather_ordered(torch.cat(v), len(images), block=bs) for n, v in out.items()}
    if sink is not None:  # several processes: gathered, then written whole
        sink.write(0, full)
        return {}
    return full


def _empty_maps(model, images, names, cfg, seed, scheduler, device, dtype, size=None) -> dict[str, torch.Tensor]:
    """(0, C, h, w) maps of every layer: one forward pass on the first image, for the shapes."""
    with FeatureExtractor(model, names, size) as fx:
        model(*denoiser_inputs(model, images[:1].to(device), cfg, torch.zeros(1, dtype=torch.long), seed, scheduler))
        return {n: fx.maps[n].detach().to("cpu", dtype)[:0] for n in names}
