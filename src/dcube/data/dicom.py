"""Read one DICOM file into a float image in [0, 1] (pydicom is imported lazily)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dcube.data.bundle import DataError

LOW_PCT, HIGH_PCT = 0.5, 99.5  # robust window: these percentiles map to 0 and 1
# named CT windows (centre, width) in Hounsfield units, after rescale slope/intercept (radiology
# conventions, e.g. Radiopaedia's "windowing (CT)")
WINDOW_PRESETS = {"lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "abdomen": (40.0, 400.0),
                  "brain": (40.0, 80.0), "bone": (400.0, 1800.0)}
WINDOWS = ("percentile", "file", *WINDOW_PRESETS)  # data.dicom_window


def is_dicom(path: Path) -> bool:
    """By suffix (.dcm/.dicom) or by the 'DICM' magic after the 128-byte preamble."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - pydicom is a test dependency
        raise DataError("reading DICOM needs pydicom: pip install 'dcube[dicom]'") from exc
    return pydicom


def window(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Map the LOW_PCT..HIGH_PCT percentiles of x (ignoring `mask`ed pixels) onto [0, 1]."""
    x = x.astype(np.float64)
    valid = x[~mask] if mask is not None and (~mask).any() else x.ravel()
    lo, hi = np.percentile(valid, [LOW_PCT, HIGH_PCT])
    if hi <= lo:
        lo, hi = valid.min(), valid.max()
    if hi <= lo:
        return np.zeros(x.shape, np.float32)
    return linear_window(x, lo, hi)


def linear_window(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """[lo, hi] -> [0, 1], clipped, float32: every window (percentile, file, preset, NIfTI volume) ends here."""
    return np.clip((np.asarray(x, np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def fixed_window(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Linear window [centre - width/2, centre + width/2] -> [0, 1] (DICOM PS3.3 C.11.2.1.2 up to the
    half-pixel terms, which do not matter at float precision)."""
    width = max(width, 1e-6)
    return linear_window(x, centre - width / 2.0, centre + width / 2.0)


def _file_window(ds, hu: np.ndarray, raw: np.ndarray) -> np.ndarray | None:
    """The file's own VOI: a VOI LUT sequence (pydicom applies it), else its first window centre/width."""
    if "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi_lut

        out = np.asarray(apply_voi_lut(raw, ds), np.float64)
        lo, hi = float(out.min()), float(out.max())
        return np.zeros(out.shape, np.float32) if hi <= lo else linear_window(out, lo, hi)
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is None or w is None:
        return None
    first = lambda v: float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)  # noqa: E731
    return fixed_window(hu, first(c), first(w))


def _padding_mask(ds, raw: np.ndarray) -> np.ndarray | None:
    pad = ds.get("PixelPaddingValue")
    if pad is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return raw == pad
    return (raw >= min(pad, limit)) & (raw <= max(pad, limit))


def dicom_frames(path: Path) -> int:
    """How many frames a DICOM file holds (1 for a single image); reads the header only."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception as exc:
        raise DataError(f"{path}: cannot read the DICOM header ({type(exc).__name__}: {exc})") from exc
    return int(ds.get("NumberOfFrames", 1) or 1)


def read_dicom(path: Path, window_mode: str = "percentile", frame: int | None = None) -> np.ndarray:
    """(H, W) grayscale or (H, W, 3) RGB float32 in [0, 1].

    Rescale slope/intercept applied, pixel padding ignored (set to 0), MONOCHROME1 inverted, palette/YBR
    colour converted to RGB. `frame`: that frame of a multi-frame file (default: the middle one).
    `window_mode` (data.dicom_window): ``percentile`` (robust 0.5-99.5 % window of the image), ``file``
    (the file's VOI LUT or window centre/width; percentile when it has none) or a named CT preset
    (WINDOW_PRESETS, in Hounsfield units).
    """
    if window_mode not in WINDOWS:
        raise DataError(f"data.dicom_window: {window_mode!r} is not one of {list(WINDOWS)}")
    pydicom = _pydicom()
    try:
        try:
            ds = pydicom.dcmread(str(path))
        except pydicom.errors.InvalidDicomError:
            ds = pydicom.dcmread(str(path), force=True)
        arr = np.asarray(ds.pixel_array)
    except DataError:
        raise
    except Exception as exc:  # pydicom raises many types for broken files
        raise DataError(f"{path}: cannot read DICOM pixel data ({type(exc).__name__}: {exc})") from exc
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and arr.ndim == (4 if spp > 1 else 3):
        k = frames // 2 if frame is None else frame
        if not 0 <= k < frames:
            raise DataError(f"{path}: frame {k} does not exist (the file has {frames} frames: 0..{frames - 1})")
        arr = arr[k]
    elif frame not in (None, 0):
        raise DataError(f"{path}: frame {frame} does not exist (a single-frame file)")
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr, spp = apply_color_lut(arr, ds), 3
    elif spp == 3 and pi.startswith("YBR") and int(pydicom.__version__.split(".")[0]) < 3:
        from pydicom.pixel_data_handlers.util import convert_color_space  # pydicom 2.x

        arr = convert_color_space(arr, pi, "RGB")
    if spp == 3:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise DataError(f"{path}: unexpected RGB DICOM pixel array of shape {arr.shape}")
        if arr.dtype == np.uint8:
            return arr.astype(np.float32) / 255.0
        return window(arr)
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2D image (or frames), got pixel array {arr.shape}")
    mask = _padding_mask(ds, arr)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = arr.astype(np.float64) * slope + intercept
    x = None
    if window_mode == "file":
        x = _file_window(ds, hu, arr)
    elif window_mode in WINDOW_PRESETS:
        x = fixed_window(hu, *WINDOW_PRESETS[window_mode])
    if x is None:
        x = window(hu, mask)
    if pi == "MONOCHROME1":
        x = 1.0 - x
    if mask is not None:
        x[mask] = 0.0
    return x
