"""The one orchestrator: a run directory, and the methods that plug into it.

:class:`Run` owns everything a method would otherwise re-implement:

* the directory: made, locked (one process per run directory, :mod:`dcube.utils.lock`), its saved
  config compared with the new one (a config part may change until the output it produced exists,
  ``Method.MADE``; the seed never), the new config saved;
* the device and the process-wide torch settings;
* the data, loaded once (:func:`dcube.data.load_data`) and recorded in ``run.json`` with the seed,
  the package versions and the wall time of every stage;
* resume: a stage whose output exists is skipped (:meth:`Run.stage`), and tensors computed from
  something else are cached under a key that says what (:meth:`Run.cached`).

A :class:`Method` (the pixel-space D-Cube pipeline, :class:`dcube.pipeline.DCube`; the latent
method, :class:`dcube.latent.run.Latent`) declares its stages, its outputs and its config checks,
and writes only what its stages compute::

    dcube.run.Run  <- owns run_dir/, config.yaml, run.json, .lock, data, caches
      |- dcube.pipeline.DCube     diffusion -> select -> classify -> evaluate
      `- dcube.latent.run.Latent  autoencoder -> diffusion -> zero_shot | analyze -> head -> finetune
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dcube.config import ConfigError, RunConfig, dump_config, from_dict, read_run_config, with_legacy_values
from dcube.preflight import check_config_file_is_ours, check_run_dir, check_run_dir_outside_data
from dcube.utils import dist
from dcube.utils.io import load_tensors, read_json, save_tensors, write_json
from dcube.utils.lock import lock_run_dir, unlock_run_dir
from dcube.utils.runtime import configure_torch, package_versions, pick_device, seed_everything

# keys that change how a stage runs or what is drawn and reported after it, never the weights or features it
# writes: changing one never makes a finished stage stale
NO_EFFECT = {"data.in_memory_mb", "diffusion.sample_grid", "classifier.target_sensitivity"}


def _changed(old: dict, new: dict, section: str, prefix: str) -> list[str]:
    o, n = old.get(section) or {}, new[section]
    return sorted(f"{section}.{k}" for k in n
                  if k.startswith(prefix) and o.get(k) != n[k] and f"{section}.{k}" not in NO_EFFECT)


def check_saved_config(cfg: RunConfig, config_file: Path, root: Path, made: dict[str, str]) -> None:
    """ConfigError when `cfg` differs from `config_file` in a part whose output (relative to `root`)
    exists, or in the seed. `made`: "section" or "section.prefix" -> output path."""
    if not config_file.exists():
        return
    old = read_run_config(config_file)
    try:  # keys added to dcube since the run was made: their old behaviour, else their defaults
        old = from_dict(with_legacy_values(old)).to_dict()
    except (TypeError, ValueError):
        pass
    new = cfg.to_dict()
    for part, output in made.items():
        section, _, prefix = part.partition(".")
        changed = _changed(old, new, section, prefix)
        if changed and (root / output).exists():
            raise ConfigError(
                f"run_dir {root}: {', '.join(changed)} differs from the value this run directory was made with "
                f"({config_file}); its outputs ({output}) would be stale. Use a new run_dir, or restore the old value.")
    if old.get("seed") != new["seed"]:
        raise ConfigError(f"run_dir {root}: seed {new['seed']} differs from the run's seed {old.get('seed')}; "
                          f"use a new run_dir")


def open_run_dir(cfg: RunConfig, made: dict[str, str], config_file: str = "config.yaml") -> Path:
    """Make and lock ``cfg.run_dir``, check the saved config against `cfg`, save `cfg`; -> the directory."""
    check_run_dir(cfg.run_dir)
    check_run_dir_outside_data(cfg)
    check_config_file_is_ours(Path(cfg.run_dir).expanduser() / config_file)
    root = Path(cfg.run_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"run_dir: cannot create {root} ({exc.strerror}); choose another run_dir") from exc
    lock_run_dir(root)  # before config.yaml is (re)written: one process per run directory
    path = root / config_file
    path.parent.mkdir(parents=True, exist_ok=True)
    check_saved_config(cfg, path, root, made)
    dump_config(cfg, path)
    return root


class Run:
    """One run directory, opened for one method (see the module docstring)."""

    def __init__(self, cfg: RunConfig, method: "Method"):
        type(method).check(cfg)  # config-level mistakes: before anything is written
        self.cfg, self.method = cfg, method
        self.dir = open_run_dir(cfg, method.MADE, method.CONFIG_FILE)  # made, locked, checked, saved
        self.device = pick_device(cfg.device)
        configure_torch(cfg.threads)
        self._data = None
        self.info = read_json(self.dir / "run.json") if (self.dir / "run.json").exists() else {}
        self.info.setdefault("timings_s", {})

    @property
    def data(self):
        if self._data is None:
            from dcube.data import load_data
            from dcube.utils.io import sha256_file

            splits = self.dir / "splits.csv"  # written once, on the first load; never by hand
            known = (self.info.get("data") or {}).get("splits_sha256")
            if known and splits.exists() and sha256_file(splits) != known:
                raise ConfigError(f"{splits}: edited after dcube wrote it (its sha256 differs from run.json's); the "
                                  f"run's models were trained on the original split. Restore it, or use a new run_dir")
            self._data = load_data(self.cfg.data, self.cfg.seed, self.dir)
            self.method.check_data(self._data)  # config against the data, before any stage trains on it
            self.info["data"] = self._data.info
            if splits.exists():
                self.info["data"]["splits_sha256"] = sha256_file(splits)
            self.save_info()
        return self._data

    def save_info(self) -> None:
        self.info.update(seed=self.cfg.seed, versions=package_versions(), device=str(self.device),
                         processes=dist.world_size())
        write_json(self.dir / "run.json", self.info)

    def timed(self, name: str, fn):
        """fn() from the run's seed, its wall time recorded in run.json under `name`."""
        seed_everything(self.cfg.seed)
        t0 = time.time()
        out = fn()
        self.info["timings_s"][name] = round(time.time() - t0, 2)
        self.save_info()
        return out

    def stage(self, name: str, output: Path | list[Path], fn, done=None, label: str | None = None):
        """Resume: when `output` (every path of a list) exists, the stage is done (-> done(), else the
        output); otherwise fn(), timed under `name`. `label` names the stage in the message."""
        outputs = output if isinstance(output, list) else [output]
        if all(p.exists() for p in outputs):
            print(f"[{label or name}] done already: {outputs[-1]}")
            return done() if done else output
        return self.timed(name, fn)

    @staticmethod
    def cached(path: Path, key, compute, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors stored at `path` with `key` (what they were computed from); compute() when the file is
        absent or was made from something else. `dtype` stores them rounded to it (read back as float32)."""
        if path.exists():
            tensors, meta = load_tensors(path)
            if meta.get("key") == key:
                return {k: v.float() if dtype is not None else v for k, v in tensors.items()}
        tensors = compute()
        save_tensors(path, {k: v.to(dtype) if dtype is not None else v for k, v in tensors.items()}, {"key": key})
        return {k: v.to(dtype).float() if dtype is not None else v for k, v in tensors.items()}

    def execute(self, stages) -> dict:
        """The method's stages named in `stages`, in the method's order; -> {stage: its result}. The
        run directory is unlocked at the end, also on an error."""
        try:
            t0, out = time.time(), {}
            for name, attr in self.method.STAGES.items():
                if name in stages:
                    out[name] = getattr(self.method, attr)()
            self.info["timings_s"]["total_this_call"] = round(time.time() - t0, 2)
            self.save_info()
            return out
        finally:
            self.close()

    def close(self) -> None:
        unlock_run_dir(self.dir)


class Method:
    """A method plugged into :class:`Run`: its stages, the outputs its config parts produce, its checks.

    Subclasses set ``STAGES`` (stage name -> the method that runs it, in order), ``MADE`` (config part
    "section" or "section.prefix" -> the output, relative to run_dir, that it produced) and
    ``CONFIG_FILE``, and may override :meth:`check`. The run's state is read through the properties
    below; a method never opens, locks or checks a run directory itself."""

    STAGES: dict[str, str] = {}
    MADE: dict[str, str] = {}
    CONFIG_FILE = "config.yaml"

    def __init__(self, cfg: RunConfig):
        self.run = Run(cfg, self)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Config-level checks (one-line ConfigError naming the field); nothing is written before them."""

    def check_data(self, data) -> None:
        """Checks of the config against the loaded data (ConfigError), before any stage uses it."""

    cfg = property(lambda self: self.run.cfg)
    dir = property(lambda self: self.run.dir)
    device = property(lambda self: self.run.device)
    data = property(lambda self: self.run.data)
    info = property(lambda self: self.run.info)

    def save_info(self) -> None:
        self.run.save_info()

    def timed(self, name: str, fn):
        return self.run.timed(name, fn)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.run.close()
