"""Image files and arrays -> float32 (C, H, W) in [-1, 1] at the configured size and channels.

Images are resized to a square image_size x image_size (no crop; the aspect ratio is not kept)
with antialiased bilinear interpolation.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from dcube.data.bundle import DataError
from dcube.data.dicom import is_dicom, read_dicom, window

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp",
                  ".dcm", ".dicom"}
_GRAY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as PIL's "L"


_alpha_warned: set[str] = set()


def _flatten_alpha(img: Image.Image, path: Path) -> Image.Image:
    """An image with transparent pixels, composited onto black (the background of medical images);
    a warning names the first such file (PIL's convert would drop the alpha and keep whatever colour the
    transparent pixels happen to store)."""
    alpha = img.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return img
    if "warned" not in _alpha_warned:
        _alpha_warned.add("warned")
        warnings.warn(f"{path}: has transparent pixels; transparent areas are drawn black (further such "
                      f"files are not named)", stacklevel=4)
    black = Image.new(img.mode, img.size, (0,) * len(img.getbands()))
    return Image.alpha_composite(black, img) if img.mode == "RGBA" else \
        Image.composite(img, black, alpha)


MAX_PIXELS = 100_000_000  # an image with more pixels is refused before it is decoded (decompression bombs)


def _read_pil(path: Path, max_pixels: int | None = None, target: int | None = None) -> np.ndarray:
    """(H, W) or (H, W, 3) float32 in [0, 1]; high bit depths are windowed like DICOM. An image above
    `max_pixels` (None: MAX_PIXELS) is refused before decoding; a large JPEG is decoded at a reduced scale
    near `target`."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
            if w * h > max_pixels:
                raise DataError(f"{path}: {w} x {h} pixels is more than {max_pixels} (a decompression bomb?); "
                                f"downsample the file")
            if target is not None and img.format == "JPEG":
                img.draft(img.mode, (2 * target, 2 * target))  # DCT scaling: decodes 1/2 .. 1/8 size
            img.load()
            if target is not None and min(img.size) > 4 * target:
                img = img.reduce(max(1, min(img.size) // (2 * target)))  # box filter; the resize follows
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = _flatten_alpha(img.convert("RGBA") if img.mode in ("P", "PA") else img, path)
            if img.mode in _GRAY_MODES:
                if img.mode in ("1", "L", "LA"):
                    return np.asarray(img.convert("L"), np.float32) / 255.0
                return window(np.asarray(img))
            return np.asarray(img.convert("RGB"), np.float32) / 255.0
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: too many pixels to decode safely ({exc}); downsample the file") from exc
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def _fit_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) -> (channels, H, W)."""
    if x.ndim == 2:
        return np.repeat(x[None], channels, axis=0)
    if channels == 3:
        return np.ascontiguousarray(x.transpose(2, 0, 1))
    return (x @ _LUMA)[None]


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) float32 -> (C, size, size), per channel with PIL's antialiased bilinear."""
    if x.shape[1:] == (size, size):
        return x
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.Resampling.BILINEAR))
                     for c in x.astype(np.float32)])


def read_image(path: str | Path, image_size: int, channels: int, max_pixels: int | None = None,
               dicom_window: str = "percentile", frame: int | None = None) -> np.ndarray:
    """Read a PNG/JPEG/TIFF/... or DICOM file -> float32 (channels, image_size, image_size) in [-1, 1].
    `max_pixels` (None: MAX_PIXELS): larger non-DICOM images are refused before they are decoded.
    `dicom_window` (data.dicom_window) and `frame` (a multi-frame DICOM's frame): see :func:`read_dicom`."""
    path = Path(path)
    x = read_dicom(path, dicom_window, frame) if is_dicom(path) else _read_pil(path, max_pixels, image_size)
    return finish(x, image_size, channels, path)


def finish(x: np.ndarray, image_size: int, channels: int, where: str | Path) -> np.ndarray:
    """A decoded (H, W) or (H, W, 3) image in [0, 1] -> the model's input: float32 (channels, image_size,
    image_size) in [-1, 1]. Every reader (image files, DICOM, NIfTI slices) ends here, in training and
    in `dcube predict` alike."""
    x = _resize(_fit_channels(x, channels), image_size)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: image holds NaN/inf values")
    return np.clip(x, 0.0, 1.0) * 2.0 - 1.0


def check_finite(images: np.ndarray, file: str | Path, split: str) -> None:
    """DataError naming the file and split when a float image array holds NaN or inf."""
    if np.issubdtype(images.dtype, np.floating):
        bad = ~np.isfinite(images.reshape(len(images), -1)).all(axis=1)
        if bad.any():
            idx = np.flatnonzero(bad)
            raise DataError(f"{file}: split {split!r} ({split}_images) holds NaN/inf values in "
                            f"{len(idx)} image(s), e.g. index {int(idx[0])}")


def check_float_range(images: np.ndarray, where: str) -> None:
    """Float images are read as [0, 1] (max <= 1) or [0, 255]; anything else (z-scored, [-1, 1], HU) would be
    clamped into a blank or washed-out image, so it is refused with the range found. Chunked: memory-mapped
    arrays are not loaded whole."""
    if not np.issubdtype(images.dtype, np.floating) or not len(images):
        return
    lo = min(float(np.min(images[s:s + 4096])) for s in range(0, len(images), 4096))
    hi = max(float(np.max(images[s:s + 4096])) for s in range(0, len(images), 4096))
    if lo < 0.0 or hi > 255.0:
        raise DataError(f"{where}: float images must lie in [0, 1] or [0, 255]; these span [{lo:.4g}, {hi:.4g}] "
                        f"(z-scored, [-1, 1] or raw scanner units?). Rescale them to [0, 1] first")


def array_to_tensor(images: np.ndarray, image_size: int, channels: int,
                    chunk: int = 4096) -> torch.Tensor:
    """(N, H, W) or (N, H, W, 3) uint8 (0..255) or float ([0, 1] or [0, 255]) -> (N, C, S, S) in [-1, 1]."""
    n = len(images)
    out = torch.empty((n, channels, image_size, image_size), dtype=torch.float32)
    scale = 255.0
    if images.dtype != np.uint8 and n and float(np.max(images)) <= 1.0:
        scale = 1.0
    for s in range(0, n, chunk):
        x = torch.from_numpy(np.asarray(images[s:s + chunk], dtype=np.float32)) / scale
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        if x.shape[1] != channels:
            x = x.repeat(1, channels, 1, 1) if x.shape[1] == 1 else \
                (x * torch.from_numpy(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if x.shape[-1] != image_size or x.shape[-2] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        out[s:s + chunk] = x.clamp(0.0, 1.0) * 2.0 - 1.0
    return out
