"""NIfTI volumes (``.nii`` / ``.nii.gz``, via nibabel, imported lazily) as stacks of 2D slices.

A volume is read once; its slices along one axis are windowed with ONE window for the whole volume
(the robust 0.5-99.5 % percentiles of all its voxels, or a named CT preset in Hounsfield units), so
the slices of one scan stay comparable. Each slice is then the (H, W) float image in [0, 1] that
every other reader returns, and goes through the same resize and scaling as training images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dcube.data.bundle import DataError
from dcube.data.dicom import HIGH_PCT, LOW_PCT, WINDOW_PRESETS, linear_window

SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


def _nibabel():
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - nibabel is a test dependency
        raise DataError("reading NIfTI needs nibabel: pip install 'dcube[nifti]'") from exc
    return nibabel


def load_volume(path: Path) -> np.ndarray:
    """The volume as a float32 array with 3 axes (a 4D file: its first volume)."""
    nib = _nibabel()
    try:
        data = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, ...
        raise DataError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    while data.ndim > 3:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: the volume holds NaN/inf values")
    return data


def volume_shape(path: Path) -> tuple[int, int, int]:
    """The (3-axis) shape :func:`load_volume` will return, from the header alone (no voxel is read)."""
    nib = _nibabel()
    try:
        shape = tuple(int(n) for n in nib.load(str(path)).shape)
    except Exception as exc:
        raise DataError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    shape = shape[:3] if len(shape) >= 3 else shape + (1,) * (3 - len(shape))
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {shape}")
    return shape


def volume_window(vol: np.ndarray, window_mode: str = "percentile") -> tuple[float, float]:
    """The one window (lo, hi) of a whole volume: a CT preset in HU, else (``percentile``, ``file``) the
    robust percentiles of all its voxels."""
    if window_mode in WINDOW_PRESETS:
        centre, width = WINDOW_PRESETS[window_mode]
        return centre - width / 2, centre + width / 2
    lo, hi = (float(v) for v in np.percentile(vol, [LOW_PCT, HIGH_PCT]))
    if hi <= lo:
        lo, hi = float(vol.min()), float(vol.max()) + 1e-6
    return lo, hi


def volume_slice(vol: np.ndarray, axis: int, index: int, window: tuple[float, float]) -> np.ndarray:
    """Slice ``vol.take(index, axis)`` as (H, W) float32 in [0, 1] under the volume's `window`."""
    return np.ascontiguousarray(linear_window(np.take(vol, int(index), axis=axis), *window))
