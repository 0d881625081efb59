"""The Python API: start a run, load a trained one, predict on arrays or files, read its metrics.

Names follow scikit-learn's (``predict_proba``, ``predict``, ``classes_``). Everything goes through the
same code as the command line: :func:`fit` is ``dcube run``, :class:`TrainedRun` wraps ``dcube predict``'s
:class:`dcube.predict.Predictor` (the calibrated probabilities of the run's own evaluation). See
``docs/api.md`` for examples (they run in the test suite).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dcube.compare import compare_runs as compare
from dcube.config import RunConfig, apply_overrides, from_dict, load_config
from dcube.data.images import array_to_tensor, check_float_range, read_image
from dcube.pipeline import run
from dcube.predict import Predictor
from dcube.report import write_report
from dcube.utils.io import read_json


class TrainedRun:
    """A finished run, ready to classify images. ``TrainedRun(run_dir)`` or :func:`load_run`."""

    def __init__(self, run_dir: str | Path, device: str = "cpu"):
        self.run_dir = Path(run_dir)
        self._predictor = Predictor(self.run_dir, device)
        self.classes_ = list(self._predictor.class_names)
        self.config: RunConfig = self._predictor.cfg

    def _tensor(self, images: Any):
        """Arrays (N, H, W) / (N, H, W, 3) (uint8, or float in [0, 1] or [0, 255]), a list of such images, or a
        list of file paths -> (N, C, S, S) in [-1, 1], preprocessed exactly as the run's training images."""
        import torch

        d = self.config.data
        if isinstance(images, (str, Path)):
            images = [images]
        if isinstance(images, (list, tuple)) and images and isinstance(images[0], (str, Path)):
            return torch.from_numpy(np.stack([read_image(p, d.image_size, d.channels, dicom_window=d.dicom_window)
                                              for p in images]))
        arr = np.asarray(images)
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3 and d.channels == 3):
            arr = arr[None]  # one image
        if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3)):
            raise ValueError(f"images: expected (N, H, W) or (N, H, W, 3) arrays or file paths, got shape {arr.shape}")
        if arr.ndim == 4 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if not np.isfinite(arr).all():
            raise ValueError("images: NaN or infinite values")
        check_float_range(arr, "images")
        return array_to_tensor(arr, d.image_size, d.channels)

    def predict_proba(self, images: Any, calibrated: bool = True) -> np.ndarray:
        """(N, n_classes) class probabilities, calibrated by the temperature fitted on validation unless
        ``calibrated=False``; columns in the order of ``classes_``."""
        raw, cal = self._predictor(self._tensor(images))
        return cal if calibrated else raw

    def predict(self, images: Any) -> list[str]:
        """The predicted class name of every image (the calibrated argmax; binary tasks: p > 0.5)."""
        p = self.predict_proba(images)
        idx = (p[:, 1] > 0.5).astype(int) if len(self.classes_) == 2 else p.argmax(axis=1)
        return [self.classes_[i] for i in idx]

    def metrics(self) -> dict:
        """The run's ``metrics.json``: test and validation metrics with CIs, calibration, per-image probabilities."""
        return read_metrics(self.run_dir)

    def __repr__(self) -> str:
        return f"TrainedRun({str(self.run_dir)!r}, classes={self.classes_})"


def load_run(run_dir: str | Path, device: str = "cpu") -> TrainedRun:
    """A finished run directory (``dcube run``'s) as a classifier."""
    return TrainedRun(run_dir, device)


def fit(config: dict | str | Path | RunConfig, overrides: Sequence[str] = (), report_heatmaps: int = 0) -> TrainedRun:
    """Run every stage of a D-Cube run (resuming what exists), as ``dcube run``; -> the trained run.

    `config`: a dict of sections (``{"run_dir": ..., "data": {...}, ...}``), a YAML file or a RunConfig;
    `overrides`: ``"section.key=value"`` strings, as ``--set``."""
    if isinstance(config, RunConfig):
        cfg = from_dict(apply_overrides(config.to_dict(), list(overrides)))
    elif isinstance(config, dict):
        cfg = from_dict(apply_overrides(config, list(overrides)))
    else:
        cfg = load_config(config, list(overrides))
    if run(cfg) is not None and report_heatmaps >= 0:
        write_report(cfg.run_dir, heatmaps=report_heatmaps)
    return TrainedRun(cfg.run_dir)


def compare_runs(runs_a, runs_b, metric: str = "auc") -> dict:
    """A's runs minus B's on the same test images (:func:`dcube.compare.compare_runs`): diff, ci, p, ..."""
    return compare(runs_a, runs_b, metric)


def read_metrics(run_dir: str | Path) -> dict:
    """``run_dir/metrics.json`` as a dict."""
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics yet; run 'dcube run' (or dcube.fit) first")
    return read_json(path)
