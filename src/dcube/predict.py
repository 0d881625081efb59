"""Apply a trained D-Cube run to new images: ``dcube predict RUN_DIR INPUT... [--out DIR]``.

Everything comes from the run directory (no training data needed): the preprocessing
(``data.image_size``/``channels`` of its config.yaml, through the same reader training used,
:func:`dcube.data.images.read_image`, DICOM included), the frozen step-1 model, the selected layers,
the feature settings (features are rounded to float16 exactly as the training cache stores them), the
EMA head chosen on validation, and the calibration (temperature, and the operating point when the run
has one) fitted on validation.

Inputs: image files (PNG, JPEG, TIFF, BMP, ...), DICOM files, folders (searched recursively) and CSV
files with a ``path`` column. A file that cannot be read is reported and skipped; the others are
predicted. Outputs: ``predictions.csv`` and ``predictions.json`` (with a header naming the model's
sha256, the dcube version, the preprocessing and "research use only").
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dcube.classify.trainer import BEST, FeatureSplit, build_head, resolve_subfeature
from dcube.config import from_dict, read_run_config
from dcube.data.dicom import dicom_frames, is_dicom
from dcube.data.images import IMAGE_SUFFIXES, finish, read_image
from dcube.data.nifti import is_nifti, load_volume, volume_shape, volume_slice, volume_window
from dcube.diffusion.schedule import ddpm_scheduler
from dcube.diffusion.trainer import load_denoiser
from dcube.evaluate.calibration import apply_temperature
from dcube.features import extract
from dcube.latent.autoencoder import LatentCodec
from dcube.latent.errormaps import NOISES as ERRORMAP_NOISES
from dcube.latent.errormaps import TIMESTEPS as ERRORMAP_TIMESTEPS
from dcube.latent.errormaps import error_map, save_overlay
from dcube.utils.io import atomic_write_text, load_checkpoint, read_json, safe_name, sha256_file, write_json
from dcube.utils.runtime import package_versions

NOTICE = "research use only, not for diagnostic use"


@dataclass
class Item:
    """One image to predict: a file, or one frame of a multi-frame DICOM, or one slice of a NIfTI volume."""

    path: Path
    error: str | None = None
    frame: int | None = None  # DICOM frame or NIfTI slice index
    axis: int | None = None  # NIfTI: the slicing axis

    @property
    def name(self) -> str:
        if self.frame is None:
            return self.path.name
        return f"{self.path.name}[{'frame' if self.axis is None else f'axis {self.axis} slice'} {self.frame}]"


@dataclass
class FrameSelection:
    """Which frames / slices of multi-image inputs: `frame` (DICOM; None = every frame), `axis` and
    `slices` (NIfTI; slices a Python-style range 'a:b' or None = all)."""

    frame: int | None = None
    axis: int = 2
    slices: str | None = None

    def slice_range(self, n: int, path: Path) -> range:
        if self.slices is None:
            return range(n)
        try:
            a, _, b = self.slices.partition(":")
            r = range(n)[slice(int(a) if a else None, int(b) if b else None)]
        except ValueError:
            raise ValueError(f"--slices {self.slices!r}: expected A:B (e.g. 10:20)") from None
        if not len(r):
            raise ValueError(f"{path}: --slices {self.slices} selects no slice of {n}")
        return r


def _expand(f: Path, sel: FrameSelection) -> list[Item]:
    """A file -> its items: every frame of a multi-frame DICOM (or `sel.frame`), the selected NIfTI slices."""
    try:
        if is_nifti(f):
            if not 0 <= sel.axis < 3:
                raise ValueError(f"--axis {sel.axis}: a volume has axes 0, 1, 2")
            return [Item(f, frame=i, axis=sel.axis) for i in sel.slice_range(volume_shape(f)[sel.axis], f)]
        if is_dicom(f):
            n = dicom_frames(f)
            if n > 1:
                if sel.frame is not None:
                    return [Item(f, frame=sel.frame)]
                return [Item(f, frame=i) for i in range(n)]
    except ValueError as exc:  # DataError included: the file is named, the others go on
        return [Item(f, f"{type(exc).__name__}: {exc}")]
    return [Item(f)]


def collect_inputs(inputs: list[str], sel: FrameSelection | None = None) -> list[Item]:
    """Items of the given files, folders (recursive: image, DICOM and NIfTI files) and CSVs (``path``
    column); multi-frame DICOMs and NIfTI volumes expand to one item per frame / slice."""
    from dcube.data.dicom import is_dicom
    from dcube.data.nifti import is_nifti

    sel = sel or FrameSelection()
    out: list[Item] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
                if f.suffix.lower() in IMAGE_SUFFIXES or is_nifti(f) or is_dicom(f):
                    out += _expand(f, sel)
        elif p.suffix.lower() == ".csv" and p.is_file():
            with p.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            if rows and "path" not in rows[0]:
                out.append(Item(p, "CSV without a 'path' column"))
                continue
            for row in rows:
                q = Path(row["path"]).expanduser()
                q = q if q.is_absolute() else p.parent / q
                out += _expand(q, sel) if q.is_file() else [Item(q, "no such file")]
        else:
            out += _expand(p, sel) if p.is_file() else [Item(p, "no such file")]
    return out


def read_items(items: list[Item], image_size: int, channels: int, dicom_window: str) -> list[tuple[Item, np.ndarray]]:
    """Decode every item through the training readers (`dcube.data.images.read_image` / `finish`); an
    unreadable item gets its error set and is left out. A NIfTI volume is read once for all its slices."""
    ok, volume = [], (None, None, None)  # (path, voxels, window): one volume in memory at a time
    for it in items:
        if it.error is not None:
            continue
        try:
            if it.axis is not None:  # NIfTI slice
                if volume[0] != it.path:
                    vol = load_volume(it.path)
                    volume = (it.path, vol, volume_window(vol, dicom_window))
                x = volume_slice(volume[1], it.axis, it.frame, volume[2])
                ok.append((it, finish(x, image_size, channels, it.name)))
            else:
                ok.append((it, read_image(it.path, image_size, channels, dicom_window=dicom_window, frame=it.frame)))
        except Exception as exc:  # any unreadable file: named, skipped
            it.error = f"{type(exc).__name__}: {exc}"
    return ok


DENOISER = "diffusion/ema.safetensors"


class Predictor:
    """The run's model as one callable: images (N, C, S, S) in [-1, 1] -> (raw, calibrated) probabilities."""

    def __init__(self, run_dir: str | Path, device: str = "cpu"):
        self.dir = Path(run_dir)

        def need(*files):
            for f in files:
                if not (self.dir / f).exists():
                    raise FileNotFoundError(f"{self.dir}: not a finished dcube run (missing {f}); run 'dcube run' first")

        need("config.yaml", "run.json", "classifier/" + BEST)
        self.cfg = from_dict(read_run_config(self.dir / "config.yaml"))
        info = read_json(self.dir / "run.json")
        self.class_names = info["data"]["class_names"]
        for f, digest in (info.get("model_sha256") or {}).items():  # as evaluated: not replaced since
            if (self.dir / f).exists() and sha256_file(self.dir / f) != digest:
                raise ValueError(f"{self.dir / f}: changed after the run was evaluated (its sha256 differs from "
                                 f"run.json's); metrics.json and the calibration belong to the original. Run "
                                 f"'dcube evaluate' on the run again, or restore the file")
        self.device = torch.device(device)
        self.layers, self.model, dcfg = [], None, self.cfg.diffusion  # the CNN-only arm: no denoiser
        if self.cfg.classifier.diffusion_features:
            need("features/selection.json", DENOISER)
            self.layers = read_json(self.dir / "features" / "selection.json")["names"]
            self.model, dcfg = load_denoiser(self.dir / DENOISER, self.device)
        self.scheduler = ddpm_scheduler(dcfg)
        s, c = self.cfg.data.image_size, self.cfg.data.channels
        probe = self._features(torch.zeros(2, c, s, s))
        cc = resolve_subfeature(self.cfg.classifier, self.dir / "classifier")  # auto: the CNN it chose
        self.head = build_head(cc, FeatureSplit(probe, torch.zeros(2, c, s, s), torch.zeros(2)),
                               len(self.class_names)).to(self.device)
        load_checkpoint(self.dir / "classifier" / BEST, {"head": self.head})
        self.head.eval()
        cal = self.dir / "classifier" / "calibration.json"
        self.calibration = read_json(cal) if cal.exists() else {"temperature": 1.0}

    def _features(self, images: torch.Tensor, index: torch.Tensor | None = None) -> list[torch.Tensor]:
        fc = self.cfg.features
        if not self.layers:  # the CNN-only arm
            return []
        # xt mode: one noise draw for every file, so a prediction never depends on the batch it came in
        out = extract(self.model, images, self.layers, fc, self.cfg.seed, self.scheduler, self.device,
                      progress=False, noise_index=torch.zeros(len(images), dtype=torch.long), size=fc.map_size)
        # as the training cache stores them (float16), so a file and its cached split agree
        return [out[n].half().float() for n in self.layers]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        feats = self._features(images)
        raw = self.head([f.to(self.device) for f in feats], images.to(self.device)).softmax(1).cpu().double().numpy()
        return raw, apply_temperature(raw, self.calibration["temperature"])

    def gradcam(self, image: torch.Tensor, class_idx: int) -> torch.Tensor:
        """(H, W) Grad-CAM (monai.visualize.GradCAM) of `class_idx` on the head's last conv stage."""
        from monai.visualize import GradCAM

        pred = self

        class Net(torch.nn.Module):  # one-input view of the head for MONAI: the frozen features inside
            def __init__(self):
                super().__init__()
                self.head = pred.head

            def forward(self, x):
                with torch.no_grad():
                    feats = [f.to(x.device) for f in pred._features(x.detach().cpu())]
                return self.head(feats, x)

        net = Net().eval()
        cam = GradCAM(net, target_layers="head.stages.2")(image[None].to(self.device), class_idx=class_idx)
        return torch.nn.functional.interpolate(cam.float(), size=image.shape[-2:], mode="bilinear",
                                               align_corners=False)[0, 0].detach().cpu()

    def diffusion_map(self, image: torch.Tensor, probs: np.ndarray) -> torch.Tensor | None:
        """The frozen denoiser's evidence map: err(runner-up) - err(predicted) (dcube.latent.errormaps);
        None for the CNN-only arm, which has no denoiser."""
        if self.model is None:
            return None

        order = np.argsort(-probs)
        return error_map(self.model, self.scheduler, LatentCodec(None), image, (int(order[0]), int(order[1])),
                         list(ERRORMAP_TIMESTEPS), ERRORMAP_NOISES, self.cfg.seed, self.device)

    def header(self) -> dict:
        from dcube.utils.io import sha256_file
        d = self.cfg.data
        return {"notice": NOTICE, "run_dir": str(self.dir.resolve()), "dcube": package_versions()["dcube"],
                "model_sha256": {"head": sha256_file(self.dir / "classifier" / "best.safetensors"),
                                 "denoiser": sha256_file(self.dir / DENOISER) if self.model is not None else None},
                "preprocessing": f"dcube.data.images.read_image / finish: decode (DICOM: rescale slope/intercept, "
                                 f"MONOCHROME1 inverted, window {d.dicom_window!r}; every frame of a multi-frame file; "
                                 f"NIfTI: slices along the chosen axis, one window {d.dicom_window!r} per volume), "
                                 f"{d.channels} channel(s), resized to {d.image_size}x{d.image_size}, scaled to [-1, 1]",
                "class_names": self.class_names, "temperature": self.calibration["temperature"],
                "threshold": self.calibration.get("threshold"),
                "positive_class": self.calibration.get("positive_class")}


def write_prediction_heatmaps(pred: Predictor, ok: list, rows: list[dict], out_dir: Path, limit: int) -> None:
    """Grad-CAM and the diffusion evidence map of the first `limit` predictions, as overlay PNGs."""
    for k, ((it, x), row) in enumerate(zip(ok[:limit], rows[:limit])):
        image = torch.from_numpy(x)
        probs = np.array([row[f"raw_prob_{n}"] for n in pred.class_names])
        c = int(probs.argmax())
        stem = f"{k:04d}_{safe_name(it.path.stem, 'image')}" + ("" if it.frame is None else f"_{it.frame}")
        title = f"{it.name}: predicted {pred.class_names[c]} (p = {row[f'prob_{pred.class_names[c]}']:.2f})"
        row["gradcam"] = str(save_overlay(image, pred.gradcam(image, c), out_dir / f"{stem}_gradcam.png", title,
                                          smooth=0.0, label="Grad-CAM (head)", caption="Grad-CAM of the predicted class",
                                          signed=False))
        evidence = pred.diffusion_map(image, probs)
        if evidence is not None:
            row["diffusion_map"] = str(save_overlay(image, evidence, out_dir / f"{stem}_diffusion.png", title))


def predict_files(run_dir: str | Path, inputs: list[str], out_dir: str | Path, batch_size: int = 64,
                  device: str = "cpu", heatmaps: int = 0, selection: FrameSelection | None = None
                  ) -> tuple[list[dict], list[Item]]:
    """Predict every readable input; write predictions.csv / .json to `out_dir` (and, with `heatmaps` > 0,
    that many Grad-CAM / diffusion-evidence overlays under out_dir/heatmaps). Returns (rows, failed)."""
    pred = Predictor(run_dir, device)
    items = collect_inputs(inputs, selection)
    d = pred.cfg.data
    ok = read_items(items, d.image_size, d.channels, d.dicom_window)
    rows = []
    thr = pred.calibration.get("threshold")
    for b in tqdm(range(0, len(ok), batch_size), desc="predict", unit="batch", disable=len(ok) <= batch_size):
        chunk = ok[b:b + batch_size]
        raw, cal = pred(torch.from_numpy(np.stack([x for _, x in chunk])))
        for (it, _), r, p in zip(chunk, raw, cal):
            row = {"path": str(it.path), "frame": it.frame, "axis": it.axis,
                   **{f"prob_{n}": float(v) for n, v in zip(pred.class_names, p)},
                   "predicted": pred.class_names[int(p.argmax())] if len(p) != 2 else pred.class_names[int(p[1] > 0.5)],
                   **{f"raw_prob_{n}": float(v) for n, v in zip(pred.class_names, r)}}
            if thr is not None:
                row["decision"] = pred.class_names[1] if p[1] >= thr else pred.class_names[0]
            rows.append(row)
    failed = [it for it in items if it.error is not None]
    out_dir = Path(out_dir)
    if heatmaps > 0:
        write_prediction_heatmaps(pred, ok, rows, out_dir / "heatmaps", heatmaps)
    header = pred.header()
    write_json(out_dir / "predictions.json", {**header, "predictions": rows,
                                              "failed": [{"path": str(i.path), "error": i.error} for i in failed]})
    buf = io.StringIO()
    buf.write(f"# {NOTICE}; model head sha256 {header['model_sha256']['head']}; dcube {header['dcube']}\n")
    fields = ["path", "frame", "axis", *[f"prob_{n}" for n in pred.class_names], "predicted"] + (["decision"] if thr is not None else [])
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out_dir / "predictions.csv", buf.getvalue())
    return rows, failed
