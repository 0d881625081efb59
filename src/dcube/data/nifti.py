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
from dcube.data.dicom import HIGH_PCT, LOW_PCT, WINDOW_PRESETS, fixed_window

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


def volume_slices(vol: np.ndarray, axis: int, indices, window_mode: str = "percentile") -> list[np.ndarray]:
    """2D slices ``vol.take(i, axis)`` for i in `indices`, each (H, W) float32 in [0, 1] under one
    window for the whole volume (``percentile`` or a CT preset; ``file`` means percentile here)."""
    if window_mode in WINDOW_PRESETS:
        centre, width = WINDOW_PRESETS[window_mode]
    else:
        lo, hi = np.percentile(vol, [LOW_PCT, HIGH_PCT])
        if hi <= lo:
            lo, hi = float(vol.min()), float(vol.max()) + 1e-6
        centre, width = (lo + hi) / 2, hi - lo
    return [np.ascontiguousarray(fixed_window(np.take(vol, int(i), axis=axis), centre, width)) for i in indices]
