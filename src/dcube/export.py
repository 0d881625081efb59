"""``dcube export RUN_DIR --format torchscript|onnx``: a finished run as ONE model file.

The exported module maps images (N, C, S, S) in [-1, 1] (what :func:`dcube.data.images.read_image`
returns) to calibrated class probabilities (N, K): the frozen denoiser at the run's timestep(s) with the
uniform class condition, its selected layers (hooks, rounded through float16 as the feature cache and
``dcube predict`` do), the sub-feature CNN and head, softmax(logits / temperature). Pixel decoding
(DICOM windows, resizing) stays outside: it is file handling, not tensor maths.

The image size is fixed at the run's ``data.image_size``; the batch size is free. ONNX goes through
``torch.onnx.export(dynamo=True)`` (needs ``dcube[export]``: onnx, onnxscript; onnxruntime to run it):
the legacy exporter has no antialiased bilinear resize, which the head uses.

What cannot be exported: ``features.input_mode: xt`` (its noise is drawn per image index from a
seeded generator, which a traced graph cannot reproduce); such a run is refused with that reason.
The whole denoiser is kept, although only the blocks up to the deepest selected layer are needed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from dcube.features.extract import shrink_map
from dcube.predict import Predictor
from dcube.utils.io import atomic_write, write_json

FORMATS = ("torchscript", "onnx")


class ExportedModel(torch.nn.Module):
    """A run's model as one module: images in [-1, 1] -> calibrated probabilities."""

    def __init__(self, pred):
        super().__init__()
        fc = pred.cfg.features
        if fc.input_mode != "x0":
            raise ValueError(f"{pred.dir}: features.input_mode={fc.input_mode!r} cannot be exported (the noise is "
                             "drawn per image index by a seeded generator); only x0 runs can")
        self.head = pred.head.eval()
        self.denoiser = pred.model.eval() if pred.model is not None else None  # None: the CNN-only arm
        self.layers = list(pred.layers)
        self.timesteps = [int(fc.timestep)]
        self.num_classes = len(pred.class_names)
        self.register_buffer("temperature", torch.tensor(float(pred.calibration["temperature"])))
        self._maps: dict[str, torch.Tensor] = {}
        self.map_size = fc.map_size
        mods = self.denoiser.feature_modules() if self.denoiser is not None else {}
        for name in self.layers:
            mods[name].register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, inputs, output):
            self._maps[name] = shrink_map(self.denoiser.to_map(name, output), self.map_size)
        return hook

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        cond = torch.full((n, self.num_classes), 1.0 / self.num_classes, dtype=images.dtype, device=images.device)
        by_t = []
        for t in self.timesteps if self.layers else []:
            self.denoiser(images, torch.full((n,), t, dtype=torch.long, device=images.device), cond)
            by_t.append([self._maps[name].half().float() for name in self.layers])
        feats = [by_t[j][i] for i in range(len(self.layers)) for j in range(len(self.timesteps))]
        return torch.softmax(self.head(feats, images) / self.temperature, dim=1)


def export(run_dir: str | Path, fmt: str = "torchscript", out: str | Path | None = None) -> Path:
    """Write the run's model as `fmt` (+ a JSON sidecar: classes, input size, preprocessing) -> its path."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: one of {list(FORMATS)}")
    pred = Predictor(run_dir)
    model = ExportedModel(pred)
    d = pred.cfg.data
    example = torch.zeros(2, d.channels, d.image_size, d.image_size)
    out = Path(out) if out else Path(run_dir) / "export" / f"model.{'pt' if fmt == 'torchscript' else 'onnx'}"

    with torch.no_grad(), warnings.catch_warnings():
        # the head's resize branches on the (fixed) input size: constants in the graph, as they should be
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if fmt == "torchscript":
            traced = torch.jit.trace(model, example, check_trace=False)
            atomic_write(out, lambda tmp: torch.jit.save(traced, str(tmp)))
        else:
            atomic_write(out, lambda tmp: torch.onnx.export(
                model, (example,), str(tmp), input_names=["images"], output_names=["probabilities"],
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}}, dynamo=True))
    write_json(out.with_suffix(".json"), {
        **pred.header(), "format": fmt, "input": {"shape": ["N", d.channels, d.image_size, d.image_size],
                                                  "range": [-1, 1], "dtype": "float32"},
        "output": "calibrated class probabilities (N, K), classes in class_names order",
        "layers": pred.layers, "timesteps": model.timesteps})
    return out
