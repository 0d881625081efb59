"""Checks that run before any training: every mistake found here costs seconds, not a step-1 run.

``check_run(cfg)`` raises :class:`ConfigError` with one line naming the field, file or value and
what to do. It checks what the config alone can tell: the device, the backbone and preset against the image size, ``features.layers``
against the backbone's feature names, and the sub-feature weights file (present, safetensors, not
a pickle); ``check_run_dir`` (a file, under a file, not writable) runs where the directory is opened
(:func:`dcube.run.open_run_dir`). Numeric ranges are ``config.validate``'s; the data's own checks (every unreadable file,
class sizes, splits) are the data stage's and also run before step 1.
"""

from __future__ import annotations

import os
from pathlib import Path

from dcube.classify.subfeatures import build_subfeature_cnn, check_weights_path
from dcube.config import CONFIG_MARK, ConfigError, RunConfig
from dcube.diffusion import build_denoiser
from dcube.diffusion.backbone import check_backbone
from dcube.utils.runtime import pick_device


def check_run_dir(run_dir: str | Path) -> None:
    """The run directory can be created and written: not a file, not under a file, writable."""
    path = Path(run_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run_dir: {path} is a file, not a folder; choose another run_dir")
    probe = path
    while not probe.exists():  # the nearest existing ancestor decides whether it can be made
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"run_dir: {path} cannot be created because {probe} is a file; choose another run_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir: {probe} is not writable (permissions); choose another run_dir "
                          f"or fix the permissions")


def check_run_dir_outside_data(cfg: RunConfig) -> None:
    """run_dir may not be, or lie inside, a folder the config scans for images: its outputs would become data
    (a CSV manifest or an npz names its images, so a run_dir beside it is fine)."""
    run = Path(cfg.run_dir).expanduser().resolve()
    for key, value in (("data.path", cfg.data.path), ("data.unlabelled", cfg.data.unlabelled),
                       ("classifier.synthetic_dir", cfg.classifier.synthetic_dir)):
        if value is None:
            continue
        folder = Path(value).expanduser().resolve()
        if folder.is_dir() and (run == folder or folder in run.parents):
            raise ConfigError(f"run_dir: {run} lies inside {key} ({folder}); the run's files would mix with the "
                              f"images. Choose a run_dir outside it")


def check_config_file_is_ours(path: Path) -> None:
    """`path` (run_dir/config.yaml) is absent or was written by dcube: dcube never overwrites a user's file."""
    if not path.is_file() or (path.parent / "run.json").exists():
        return  # runs made before the mark existed have run.json beside their config.yaml
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8", "replace").strip()
    if not first.startswith(CONFIG_MARK):
        raise ConfigError(f"run_dir: {path} exists and was not written by dcube; dcube would overwrite it. "
                          f"Choose another run_dir, or move the file")


def check_device(name: str) -> None:
    """`device: cuda` on a machine without one: the ConfigError of the device choice itself."""
    pick_device(name)


def check_denoiser_spec(cfg: RunConfig) -> None:
    """Build the step-1 denoiser once (on the CPU, seconds) to check preset, image size and layer names."""
    try:
        model = build_denoiser(cfg.diffusion, cfg.data.channels, cfg.data.image_size, num_classes=2)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    names = list(model.feature_names)
    bad = [n for n in cfg.features.layers or [] if n not in names]
    if bad:
        raise ConfigError(f"features.layers: {bad} are not layers of the {cfg.diffusion.backbone} "
                          f"{cfg.diffusion.preset!r} backbone; its layers are {names}")


def check_init_from(cfg: RunConfig) -> None:
    """diffusion.init_from: a dcube step-1 model of this run's architecture, preset, image size and channels."""
    if cfg.diffusion.init_from is None:
        return
    try:
        check_backbone(cfg.diffusion.init_from, cfg.diffusion, cfg.data.channels, cfg.data.image_size)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from exc


def check_subfeature(cfg: RunConfig) -> None:
    cc = cfg.classifier
    if cc.subfeature == "none" or cc.subfeature_weights is None:
        return
    try:
        check_weights_path(cc.subfeature_weights)
        # read as safetensors (never unpickled) and matched to the network's tensor names and shapes: seconds
        # here instead of after step 1
        build_subfeature_cnn(cc.subfeature, cfg.data.channels, cfg.data.image_size, cc.subfeature_weights)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"classifier.subfeature_weights: {exc}") from exc


def check_paths(cfg: RunConfig) -> None:
    for key, value in (("classifier.synthetic_dir", cfg.classifier.synthetic_dir),
                       ("data.unlabelled", cfg.data.unlabelled)):
        if value is not None and not Path(value).expanduser().exists():
            raise ConfigError(f"{key}: {value} does not exist")
    if cfg.classifier.synthetic_dir is not None:
        from dcube.generate.synthetic import MANIFEST

        if not (Path(cfg.classifier.synthetic_dir).expanduser() / MANIFEST).is_file():
            raise ConfigError(f"classifier.synthetic_dir: {cfg.classifier.synthetic_dir} is not a set of "
                              f"`dcube synthesize` (no {MANIFEST})")


def check_run(cfg: RunConfig) -> None:
    """Every config-level check, in the order a user would fix them (the run directory is checked where it
    is opened, dcube.run.open_run_dir)."""
    check_device(cfg.device)
    check_denoiser_spec(cfg)
    check_init_from(cfg)
    check_subfeature(cfg)
    check_paths(cfg)
