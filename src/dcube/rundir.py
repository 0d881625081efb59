"""One run directory, opened the same way by every method (the D-Cube pipeline and the latent method).

:func:`open_run_dir` checks that the directory can be made, makes it, takes its lock (one process per
run directory, :mod:`dcube.utils.lock`), refuses a config or seed that differs from the one its
outputs were made with, and saves the config. ``made`` says which output each part of the config
produced: a part may change freely until that output exists.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from dcube.config import ConfigError, RunConfig, dump_config, from_dict, with_legacy_values


NO_EFFECT = {"data.workers"}  # keys that change how a stage runs, never what it writes


def _changed(old: dict, new: dict, section: str, prefix: str) -> list[str]:
    o, n = old.get(section) or {}, new[section]
    return sorted(f"{section}.{k}" for k in n
                  if k.startswith(prefix) and o.get(k) != n[k] and f"{section}.{k}" not in NO_EFFECT)


def check_saved_config(cfg: RunConfig, config_file: Path, root: Path, made: dict[str, str]) -> None:
    """ConfigError when `cfg` differs from `config_file` in a part whose output (relative to `root`)
    exists, or in the seed. `made`: "section" or "section.prefix" -> output path."""
    if not config_file.exists():
        return
    old = yaml.safe_load(config_file.read_text()) or {}
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
    from dcube.preflight import check_run_dir
    from dcube.utils.lock import lock_run_dir

    check_run_dir(cfg.run_dir)
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
