"""One typed configuration that flows through every stage.

A run is described by :class:`RunConfig`; each stage reads only its own section
(``data``, ``diffusion``, ``features``, ``classifier``). YAML files map onto these
dataclasses one to one; an unknown or mistyped key is an error that names the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dcube.utils.errors import ConfigError  # noqa: F401  (dcube.config.ConfigError is the public name)
from dcube.utils.io import atomic_write_text

CONFIG_MARK = "# dcube: the resolved configuration of this run"  # the first line of every config.yaml it writes


@dataclass
class DataConfig:
    source: str = "medmnist"  # medmnist | folder | csv
    name: str = "pneumoniamnist"  # MedMNIST dataset name (source=medmnist)
    path: Optional[str] = None  # npz file, image-folder root or CSV manifest
    image_size: int = 28  # images are resized to image_size x image_size
    channels: int = 1  # 1 = grayscale, 3 = RGB
    val_fraction: float = 0.1  # used when the source has no predefined split
    test_fraction: float = 0.2  # used when the source has no predefined split
    split_seed: Optional[int] = None  # seed of the split and the caps; None = the run's seed
    max_train: Optional[int] = None  # stratified subsample caps (quick runs, tests)
    minority_ratio: Optional[float] = None  # cut the smallest training class to ratio x the largest
    labelled_per_class: Optional[int] = None  # keep k labelled training images per class (seeded; nested over k)
    max_val: Optional[int] = None  # stratified cap on the validation split
    max_test: Optional[int] = None  # stratified cap on the test split
    download: bool = True  # MedMNIST: download when absent from the cache
    unlabelled: Optional[str] = None  # folder / CSV (path column) / npz of images WITHOUT labels: step 1 only
    unlabelled_rest: bool = False  # the training images max_train / minority_ratio leave out join step 1 unlabelled
    classes: Optional[list] = None  # folder / CSV: the class names expected (others are an error); None = found
    group_pattern: Optional[str] = None  # regex on the file name grouping images by patient, e.g. 'person(\\d+)_'
    duplicates: str = "near"  # folder / CSV splits: near (re-encoded copies too: 16x16 thumbnails within 8 grey levels RMS) | exact (byte-identical) | off; each group stays in one split
    dicom_window: str = "percentile"  # percentile (robust 0.5-99.5 %) | file (VOI LUT / window from the file) | lung | mediastinum | abdomen | brain | bone
    in_memory_mb: Optional[float] = 4096  # a split bigger than this as float32 is decoded once to run_dir/cache/images (uint8) and read per batch; 0 = always on disk, None = always in RAM


@dataclass
class DiffusionConfig:
    backbone: str = "unet"  # unet (MONAI DiffusionModelUNet) | uvit
    preset: str = "tiny"  # size preset of the backbone, see dcube.diffusion
    num_train_timesteps: int = 1000  # DDPM steps T (the linear beta schedule 1e-4 .. 0.02 of both papers)
    epochs: int = 5  # or "auto": stop when the validation probe (at every checkpoint) stops improving (patience); 0: the seeded initialisation (the untrained control arm)
    max_steps: Optional[int] = None  # stop after this many optimiser steps
    patience: int = 5  # epochs=auto: probe evaluations without improvement before stopping
    batch_size: int = 64  # step-1 images per optimiser step
    lr: float = 2e-4  # AdamW learning rate (no weight decay)
    ema_decay: float = 0.999  # EMA of the denoiser's weights (the EMA model is the one saved and used)
    contrastive_weight: float = 0.1  # 0 switches the contrastive loss off (the paper: 1)
    contrastive_form: str = "normalized"  # normalized (unit features, uniform condition, margin 1) | paper (Eq. 4, margin 0.1)
    checkpoint_every: int = 200  # optimiser steps between checkpoints (epochs=auto: and between validation probes)
    sample_grid: bool = True  # samples.png: 8 DDIM-50 samples per class at the end of training (seconds; more: dcube synthesize)
    class_dropout: float = 0.1  # P(label -> null class) in training: classifier-free guidance
    init_from: Optional[str] = None  # a `dcube pretrain` backbone (or step-1 model) to start step 1 from; epochs 0 keeps it frozen


@dataclass
class FeatureConfig:
    input_mode: str = "x0"  # x0 (clean image) | xt (noised at `timestep`, fixed seed)
    timestep: int = 50  # the same timestep at train and test time
    layers: Optional[list] = None  # explicit layer names; None = the non-Gaussian ones (the paper's Eq. 6, per image map)
    max_layers: Optional[int] = 4  # at most this many selected layers (lowest p first)
    ks_keep: str = "least_gaussian"  # most_gaussian: the ablation, as many layers from the other end
    map_size: Optional[int] = None  # the head's maps stored at most this size (antialiased); None = as the layer gives them


@dataclass
class ClassifierConfig:
    subfeature: str = "efficientnet-lite0"  # efficientnet-lite0 | resnet18 | none | auto (both, chosen on validation)
    subfeature_weights: Optional[str] = None  # weights file for the sub-feature CNN
    diffusion_features: bool = True  # false: the control arm, this head on the sub-feature CNN alone (no step 1)
    flip_augment: bool = True  # random horizontal flips in training (the cached flipped features)
    epochs: int = 10  # step-2 epochs (the model kept is the best on validation)
    min_steps: int = 0  # at least this many optimiser steps: repeated passes per epoch on a small training set
    batch_size: int = 64  # step-2 images per optimiser step
    lr: float = 1e-3  # AdamW learning rate of the head (the pretrained CNN: a tenth of it; weight decay 1e-4)
    cycle_weight: float = 0.0  # > 0 switches the cycle loss on (the paper: 10 and 100); off: validation did not choose it
    consistency_weight: float = 0.1  # 0 switches the flip-consistency loss off
    target_sensitivity: Optional[float] = None  # binary: the threshold reaching this validation sensitivity
    synthetic_dir: Optional[str] = None  # a `dcube synthesize` output added to the TRAINING split only


@dataclass
class LatentConfig:
    """Latent diffusion (ISBI 2025 method): autoencoder, zero-shot classifier, analysis, head."""

    autoencoder: Optional[str] = None  # safetensors AutoencoderKL weights to use; None = train one
    ae_channels: list = field(default_factory=lambda: [16, 32, 32])  # L levels: 2**(L-1) downsampling
    ae_epochs: int = 5  # autoencoder epochs (its batch, learning rate and crops: dcube.latent.autoencoder)


@dataclass
class ComputeConfig:
    """How the heavy stages run: precision, memory, speed. None of it changes the optimisation
    (batch order, steps, losses); a memory layout changes only the rounding (channels-last step 2
    matches contiguous within 1e-4 in the tests).

    Several processes (``accelerate launch`` / ``torchrun``) need no key: the launcher's
    environment is enough (docs/multi-gpu.md)."""

    mixed_precision: str = "no"  # no | bf16 | fp16: training forward passes under torch.autocast
    grad_accum: int = 1  # each process runs its share of a batch in this many micro-batches
    compile: bool = False  # torch.compile the denoiser for step-1 training
    # channels-last memory format in training: no | step2 (the head only) | all (step 1 too); YAML false / true
    # mean no / all. step2 by default: it speeds step 2 up without changing its validation AUC, and step 1 gains
    # nothing from it (BENCHMARKS.md, speed)
    channels_last: str = "step2"


@dataclass
class RunConfig:
    run_dir: str = "runs/demo"  # the run directory: every output, checkpoint and lock of the run
    seed: int = 0  # seed of the split, the initialisations and every sampler
    device: str = "auto"  # auto | cpu | cuda
    threads: Optional[int] = None  # torch intra-op threads (None = torch default)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "data.source": ("medmnist", "folder", "csv"),
    "data.channels": (1, 3),
    "data.dicom_window": ("percentile", "file", "lung", "mediastinum", "abdomen", "brain", "bone"),
    "diffusion.backbone": ("unet", "uvit"),
    "diffusion.contrastive_form": ("normalized", "paper"),
    "features.input_mode": ("x0", "xt"),
    "features.ks_keep": ("least_gaussian", "most_gaussian"),
    "data.duplicates": ("near", "exact", "off"),
    "classifier.subfeature": ("efficientnet-lite0", "resnet18", "none", "auto"),
    "device": ("auto", "cpu", "cuda"),
    "compute.mixed_precision": ("no", "bf16", "fp16"),
    "compute.channels_last": ("no", "step2", "all"),
}
# keys added after runs were made, with the behaviour those runs had: an older run directory's
# config.yaml without them is read with these values (not today's defaults), so a changed
# behaviour is reported as a changed section instead of silently evaluating old weights differently
LEGACY_VALUES = {
    "classifier.flip_augment": False,
    "data.duplicates": "exact",
}
# keys removed in dcube 1.0 (CHANGELOG.md; the last commit with them is tagged pre-1.0-variants) -> the
# behaviour that stayed: an old run's config.yaml that says so still loads; another value is refused, naming
# the key (ANY: the key only tuned a removed variant, so whatever it says, the run behaves as today)
ANY = object()
REMOVED = {
    "classifier.score_norm": "none", "classifier.ce_weight": 1.0, "classifier.cycle_form": "soft",
    "classifier.cycle_trials": ANY, "features.select": "ks_map", "features.ks_values": ANY,
    "features.probe_layers": ANY, "features.probe_folds": ANY, "features.condition": "uniform",
    "features.timesteps": None, "diffusion.loss_weighting": "uniform", "diffusion.min_snr_gamma": ANY,
    "latent.contrastive": False,
    # fixed in the code (dcube.latent.autoencoder / head): knobs no study or user changed
    "latent.ae_num_res_blocks": 1, "latent.ae_norm_groups": 8, "latent.ae_batch_size": 16, "latent.ae_lr": 5e-4,
    "latent.ae_kl_weight": 1e-6, "latent.ae_crop": 64, "latent.ae_checkpoint_every": ANY, "latent.head_hidden": 128,
    "latent.head_lr": 1e-3, "latent.head_weight_decay": 1e-4, "latent.finetune_lr": 1e-5,
    "latent.finetune_batch_size": 32,
    "diffusion.beta_start": 1e-4, "diffusion.beta_end": 0.02, "diffusion.weight_decay": 0.0,
    "diffusion.auto_max_epochs": 1000, "diffusion.probe_images": 512, "diffusion.sample_steps": ANY,
    "diffusion.grid_samplers": ["ddim"],
    "classifier.fuse_size": 16, "classifier.cnn_lr": 1e-4, "classifier.weight_decay": 1e-4,
    "classifier.cycle_batch": 16, "classifier.consistency_batch": 32, "classifier.bn_recalibration": 1024,
    "classifier.cnn_frozen_blocks": 0, "classifier.cnn_input_size": 64,
    "features.ks_min_effect": 0.02, "features.ks_map_values": 4096, "features.ks_fallback_k": 2,
    "features.ks_images": 256, "features.batch_size": ANY, "features.ks_alpha": 0.05,
    "data.min_class_images": 2, "data.allow_outside_root": False, "data.max_pixels": 100_000_000,
    "classifier.synthetic_ratio": None, "latent.ae_max_steps": None,
    # each contrastive form's own margin (dcube.diffusion.losses): what the config said for it
    "diffusion.contrastive_margin": lambda section: 0.1 if section.get("contrastive_form") == "paper" else 1.0,
    "latent.ae_latent_channels": 4,
    "data.workers": ANY,  # reading ahead never changed a result: dcube.utils.rows.reader_workers
    "classifier.ema_decay": 0.999, "classifier.class_weighting": False, "classifier.select_metric": "auc",
    "diffusion.eval_every": 200,  # epochs=auto probes at every checkpoint (diffusion.checkpoint_every, also 200)
}
# keys moved to a command's options in dcube 1.0 -> (their default, the option): an old config.yaml with the
# default loads; another value is refused, naming the option that replaces the key
MOVED = {
    "latent.zs_adaptive": (False, "dcube classify-zero-shot --adaptive"),
    "latent.zs_first_round": (4, "dcube classify-zero-shot --first-round"),
    "latent.zs_drop_z": (2.0, "dcube classify-zero-shot --drop-z"),
    "latent.analysis_timesteps": ([10, 50, 100, 200, 400, 600, 800], "dcube analyze --timesteps"),
    "latent.analysis_images": (512, "dcube analyze --images"),
    "latent.analysis_zs_images": (128, "dcube analyze --zs-images"),
    "latent.analysis_zs_trials": (4, "dcube analyze --zs-trials"),
    "latent.analysis_folds": (5, "dcube analyze --folds"),
    "latent.analysis_top_layers": (2, "dcube analyze --top-layers"),
    "latent.errormap_timesteps": ([100, 250, 400], "nothing: error maps use fixed trials (dcube.latent.errormaps)"),
    "latent.errormap_noises": (2, "nothing: error maps use fixed trials (dcube.latent.errormaps)"),
    "latent.zs_trials": (16, "dcube classify-zero-shot --trials"),
    "latent.head_epochs": (60, "dcube train-latent-head --epochs"),
    "latent.finetune_epochs": (3, "dcube train-latent-head --finetune-epochs"),
    "latent.zs_timesteps": (None, "dcube classify-zero-shot --timesteps"),
    "latent.zs_t_min": (50, "dcube classify-zero-shot --t-min"),
    "latent.zs_t_max": (950, "dcube classify-zero-shot --t-max"),
    "latent.zs_weighting": ("uniform", "dcube classify-zero-shot --weighting"),
    "latent.zs_temperature": (1.0, "dcube classify-zero-shot --temperature"),
    "latent.zs_batch_size": (ANY, "dcube classify-zero-shot --batch-size"),
}
# words a numeric key also takes
_WORDS = {"diffusion.epochs": ("auto",)}
# YAML 1.1 reads a bare `no` as false: accept it where "no" is a choice; true/false of a key that was a bool
_BOOL_MEANS = {"compute.mixed_precision": {False: "no"}, "compute.channels_last": {False: "no", True: "all"},
               "data.duplicates": {False: "off"}}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (as a string or type); ints widen to floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return value
    return value


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in values.items() if not _removed(prefix, k, v, values)}
    unknown = sorted((k for k in values if k not in names), key=repr)  # keys may be any YAML scalar
    if unknown:
        key = prefix + unknown[0] if isinstance(unknown[0], str) else f"{prefix}{unknown[0]!r}"
        raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        where = prefix + name
        if isinstance(value, bool) and value in _BOOL_MEANS.get(where, {}):
            value = _BOOL_MEANS[where][value]
        if where in _WORDS and value in _WORDS[where]:
            kwargs[name] = value
            continue
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, where + ".")
        else:
            kwargs[name] = _coerce(value, tp, where)
    return cls(**kwargs)


def _removed(prefix: str, key: Any, value: Any, section: dict) -> bool:
    """True for a key removed in dcube 1.0 whose value is the behaviour that stayed (dropped); an error for
    one that asks for a removed variant; False for any other key. `section`: the mapping the key is in (a
    kept value may depend on its neighbours)."""
    where = f"{prefix}{key}"
    if isinstance(key, str) and where in MOVED:
        default, option = MOVED[where]
        if default is ANY or value == default:
            return True
        raise ConfigError(f"{where}: moved out of the configuration in dcube 1.0; use {option} (CHANGELOG.md)")
    if not isinstance(key, str) or where not in REMOVED:
        return False
    kept = REMOVED[where]
    kept = kept(section) if callable(kept) else kept
    if kept is ANY or value == kept:
        return True
    raise ConfigError(f"{where}: removed in dcube 1.0 with its variant {value!r} (see CHANGELOG.md; the code "
                      f"before the removal is tagged pre-1.0-variants); leave the key out")


def validate(cfg: RunConfig) -> RunConfig:
    """Raise ConfigError naming the field for any value outside its allowed range."""
    for key, allowed in _CHOICES.items():
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj not in allowed:
            raise ConfigError(f"{key}: {obj!r} is not one of {list(allowed)}")
    positive = {
        "data.image_size": cfg.data.image_size,
        "diffusion.checkpoint_every": cfg.diffusion.checkpoint_every,
        "classifier.epochs": cfg.classifier.epochs,
        "diffusion.batch_size": cfg.diffusion.batch_size,
        "diffusion.num_train_timesteps": cfg.diffusion.num_train_timesteps,
        "classifier.batch_size": cfg.classifier.batch_size,
        "compute.grad_accum": cfg.compute.grad_accum,
        "diffusion.patience": cfg.diffusion.patience,
        "diffusion.lr": cfg.diffusion.lr,
        "classifier.lr": cfg.classifier.lr,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v}")
    optional_positive = {"threads": cfg.threads, "diffusion.max_steps": cfg.diffusion.max_steps,
                         "features.max_layers": cfg.features.max_layers,
                         "features.map_size": cfg.features.map_size,
                         }
    if cfg.diffusion.epochs != "auto" and cfg.diffusion.epochs < 0:
        raise ConfigError(f"diffusion.epochs: must be >= 0 (0: the untrained denoiser) or 'auto', "
                          f"got {cfg.diffusion.epochs}")
    for key, v in optional_positive.items():
        if v is not None and v <= 0:
            raise ConfigError(f"{key}: must be >= 1 (or left out), got {v}")
    for key, v in {
        "diffusion.contrastive_weight": cfg.diffusion.contrastive_weight,
        "classifier.cycle_weight": cfg.classifier.cycle_weight,
        "classifier.consistency_weight": cfg.classifier.consistency_weight,
        "classifier.min_steps": cfg.classifier.min_steps,
        "data.in_memory_mb": 0 if cfg.data.in_memory_mb is None else cfg.data.in_memory_mb,
    }.items():
        if v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v}")
    if not 0 <= cfg.seed < 2 ** 32:
        raise ConfigError(f"seed: must lie in [0, 2**32 - 1], got {cfg.seed}")
    if cfg.threads is not None and cfg.threads > 1024:
        raise ConfigError(f"threads: must lie in [1, 1024] (torch threads of this process), got {cfg.threads}")
    if cfg.diffusion.num_train_timesteps < 2:
        raise ConfigError(f"diffusion.num_train_timesteps: must be >= 2, got {cfg.diffusion.num_train_timesteps}")
    if cfg.features.layers is not None and not cfg.features.layers:
        raise ConfigError("features.layers: an empty list selects no layer; leave the key out (or null) to "
                          "select the non-Gaussian layers")
    if not 0 <= cfg.features.timestep < cfg.diffusion.num_train_timesteps:
        raise ConfigError(
            f"features.timestep: must lie in [0, {cfg.diffusion.num_train_timesteps}), "
            f"got {cfg.features.timestep}"
        )
    if not 0 <= cfg.diffusion.class_dropout < 1:
        raise ConfigError(f"diffusion.class_dropout: must lie in [0, 1), got {cfg.diffusion.class_dropout}")
    ts = cfg.classifier.target_sensitivity
    if ts is not None and not 0 < ts < 1:
        raise ConfigError(f"classifier.target_sensitivity: must lie in (0, 1), got {ts}")
    for key in ("val_fraction", "test_fraction"):
        v = getattr(cfg.data, key)
        if not 0 <= v < 1:
            raise ConfigError(f"data.{key}: must lie in [0, 1), got {v}")
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1:
        raise ConfigError(f"data.val_fraction + data.test_fraction: {cfg.data.val_fraction} + "
                          f"{cfg.data.test_fraction} leaves no images for training; lower them")
    if cfg.data.group_pattern is not None:
        import re

        try:
            re.compile(cfg.data.group_pattern)
        except re.error as exc:
            raise ConfigError(f"data.group_pattern: {cfg.data.group_pattern!r} is not a regular expression ({exc})")
    if cfg.data.classes is not None and (len(cfg.data.classes) < 2 or len(set(map(str, cfg.data.classes)))
                                         < len(cfg.data.classes)):
        raise ConfigError(f"data.classes: need at least 2 distinct names, got {cfg.data.classes!r}")
    for key in ("diffusion.ema_decay",):
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name)
        if not 0 <= v < 1:
            raise ConfigError(f"{key}: must lie in [0, 1), got {v}")
    if cfg.classifier.subfeature == "auto" and cfg.classifier.subfeature_weights is not None:
        raise ConfigError("classifier.subfeature_weights: one weights file cannot serve both candidates of "
                          "classifier.subfeature 'auto'; name the CNN instead")
    if not cfg.classifier.diffusion_features:  # the CNN-only control arm
        if cfg.classifier.subfeature == "none":
            raise ConfigError("classifier.diffusion_features: false leaves the head no input with "
                              "classifier.subfeature 'none'; name a sub-feature CNN")
        if cfg.classifier.cycle_weight > 0:
            raise ConfigError("classifier.cycle_weight: the cycle loss needs the step-1 denoiser, which "
                              "classifier.diffusion_features: false does not train; set it to 0")
    validate_data(cfg.data)
    validate_latent(cfg.latent)
    return cfg


def validate_data(dc: DataConfig) -> None:
    """The ``data`` section's rules (also checked by dcube.data.load_data for a DataConfig built in Python)."""
    if dc.source not in _CHOICES["data.source"]:
        raise ConfigError(f"data.source: {dc.source!r} is not one of {list(_CHOICES['data.source'])}")
    if dc.channels not in _CHOICES["data.channels"]:
        raise ConfigError(f"data.channels: {dc.channels!r} is not 1 or 3")
    if dc.image_size <= 0:
        raise ConfigError(f"data.image_size: must be > 0, got {dc.image_size}")
    for split in ("train", "val", "test"):
        cap = getattr(dc, f"max_{split}")
        if cap is not None and cap <= 0:
            raise ConfigError(f"data.max_{split}: must be > 0 or null, got {cap}")
    if dc.labelled_per_class is not None and dc.labelled_per_class < 1:
        raise ConfigError(f"data.labelled_per_class: must be >= 1 or null, got {dc.labelled_per_class}")
    if dc.minority_ratio is not None and not 0 < dc.minority_ratio <= 1:
        raise ConfigError(f"data.minority_ratio: must lie in (0, 1], got {dc.minority_ratio}")
    if dc.source in ("folder", "csv") and not dc.path:
        raise ConfigError(f"data.path: required when data.source is {dc.source!r}")


def validate_latent(lc: LatentConfig) -> None:
    """The ``latent`` section's rules."""
    for name in ("ae_epochs",):
        if getattr(lc, name) < 0:
            raise ConfigError(f"latent.{name}: must be >= 0, got {getattr(lc, name)}")
    if not lc.ae_channels or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0
                                     for c in lc.ae_channels):
        raise ConfigError(f"latent.ae_channels: a list of positive channel counts, got {lc.ae_channels!r}")


def from_dict(values: dict) -> RunConfig:
    return validate(_build(RunConfig, values or {}, ""))


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice "
                                  f"(also at line {seen[key] + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict: UTF-8, a mapping at the top, no key twice; else ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from exc
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, diffusion:, ...), "
                          f"got a {type(values).__name__}")
    return values


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load a YAML file; `overrides` are ``section.key=value`` strings (YAML-parsed values)."""
    try:
        return from_dict(apply_overrides(read_yaml(path), overrides or []))
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from exc


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    values = dict(values)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML "
                              f"({' '.join(str(exc).split())[:120]}); quote it") from exc
    return values


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    body = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write_text(path, f"{CONFIG_MARK} (written by dcube; edit your own file, not this one) "
                      f"sha256:{hashlib.sha256(body.encode()).hexdigest()}\n" + body)


def read_run_config(path: str | Path) -> dict:
    """A run directory's config.yaml as a dict; ConfigError naming it when its text no longer matches the
    sha256 dcube wrote into its first line (edited by hand: the run's outputs were made with the old one)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    first, _, body = text.partition("\n")
    if first.startswith(CONFIG_MARK) and "sha256:" in first:
        if hashlib.sha256(body.encode()).hexdigest() != first.rsplit("sha256:", 1)[1].strip():
            raise ConfigError(f"{path}: edited after dcube wrote it; the run's models were made with the original. "
                              f"Restore it (or delete the run directory), and put changes in your own config file")
    return yaml.safe_load(text) or {}


def with_legacy_values(values: dict) -> dict:
    """A saved config dict with every LEGACY_VALUES key it lacks set to the old behaviour."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in (values or {}).items()}
    for key, old in LEGACY_VALUES.items():
        section, name = key.split(".")
        if isinstance(out.get(section), dict) and name not in out[section]:
            out[section][name] = old
    return out



def _field_comments(cls: type) -> dict[str, str]:
    """{field: its comment} from the dataclass's own source: the comment at the end of the field's
    line, else the comment lines right above it (the definitions are the documentation)."""
    import inspect
    import io
    import tokenize

    out, above, line_of = {}, [], {}
    src = inspect.getsource(cls)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.line.strip().startswith("#"):
                above.append(text)
            elif tok.start[0] in line_of:
                out[line_of[tok.start[0]]] = text
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.line[4:].split(":")[0].strip() == tok.string:
            line_of[tok.start[0]] = tok.string
            if above:
                out[tok.string] = " ".join(above)
            above = []
        elif tok.type == tokenize.NL and not tok.line.strip():
            above = []
    return out


def config_reference() -> str:
    """docs/config.md: one line per key (name, default, choices, what it does), generated from the
    dataclasses above; `make docs` writes it and a test fails when it is stale."""
    rows = ["# Configuration reference", "",
            "Generated from `dcube.config` by `python -m dcube.config > docs/config.md` (a test fails when it "
            "is stale). `dcube config` prints the full configuration; `--set section.key=value` overrides a key.", ""]

    def section(cls: type, prefix: str) -> None:
        notes = _field_comments(cls)
        rows.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "", "| key | default | what it does |", "|---|---|---|"])
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            key = prefix + f.name
            choices = _CHOICES.get(key)
            note = notes.get(f.name, "")
            if choices and not all(str(c) in note for c in choices):
                note = f"{note} (one of: {', '.join(map(str, choices))})".strip()
            cell = note.replace("|", "\\|")
            rows.append(f"| `{key}` | `{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}` | {cell} |")
        rows.append("")

    section(RunConfig, "")
    for f in dataclasses.fields(RunConfig):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            section(f.default_factory, f.name + ".")
    n = sum(1 for r in rows if r.startswith("| `"))
    rows.insert(4, f"{n} keys.")
    rows.insert(5, "")
    return "\n".join(rows)


if __name__ == "__main__":
    print(config_reference())
