"""What every command shares: the config arguments, loading them, and how an error is reported.

* A user error (config, data, a missing file, a locked run directory) is one line on stderr and exit
  code 2, before any training when it can be known then.
* Anything else is a bug: one line naming the exception and a log file that holds the traceback,
  exit code 1.
* Ctrl-C is one line with the command that resumes the run, exit code 130.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

from dcube.config import ConfigError, RunConfig, apply_overrides, from_dict, load_config


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Help text that shows every option's default (unless its help already says it, or there is none
    to show) and keeps the descriptions' line breaks."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        d = action.default
        if "default" in help_ or d in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return help_
        return f"{help_} (default: {d})" if help_ else f"default: {d}"


def add_config_args(sp: argparse.ArgumentParser, what: str = "YAML configuration (docs/config.md: every key)"):
    sp.add_argument("config", nargs="?", help=f"{what}; without it, the defaults (+ --set)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set classifier.epochs=5 (repeatable)")
    sp.add_argument("--run-dir", help="override run_dir")


def config_from_args(args) -> RunConfig:
    """The config of `args` (file + --set + --run-dir), validated; remembers run_dir for error logs."""
    cfg = load_config(args.config, args.set) if args.config else from_dict(apply_overrides({}, args.set))
    if args.run_dir:
        cfg.run_dir = args.run_dir
    args._run_dir = cfg.run_dir
    return cfg


def user_errors() -> tuple[type[BaseException], ...]:
    from dcube.data import DataError
    from dcube.utils.lock import RunDirLocked

    return ConfigError, DataError, FileNotFoundError, FileExistsError, RunDirLocked, ValueError


def _log_traceback(args) -> Path | str:
    """The traceback in RUN_DIR/logs/ when the run directory exists, else in the temp folder; when no log can be
    written at all (a full or read-only disk), a phrase saying so instead of a path."""
    run_dir = Path(getattr(args, "_run_dir", None) or "")
    folder = run_dir / "logs" if str(run_dir) not in ("", ".") and run_dir.is_dir() else Path(tempfile.gettempdir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"dcube-error-{time.strftime('%Y%m%d-%H%M%S')}.log"
        path.write_text(f"dcube {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
    except OSError:
        try:
            path = Path(tempfile.mkstemp(prefix="dcube-error-", suffix=".log")[1])
            path.write_text(traceback.format_exc())
        except OSError as exc:
            return f"no log file (none could be written: {exc.strerror or exc})"
    return path


def guard(fn):
    """Wrap a command handler ``fn(args) -> exit code`` with the error rules of this module."""

    def handler(args) -> int:
        try:
            return fn(args) or 0
        except KeyboardInterrupt:
            argv = getattr(args, "_argv", None)
            again = f"dcube {shlex.join(argv)}" if argv else "the same command"
            print(f"\ndcube: interrupted; every finished step and checkpoint is kept. Resume with: {again}",
                  file=sys.stderr)
            return 130
        except user_errors() as exc:
            msg = " ".join(str(exc).split())  # one line
            if type(exc) is ValueError:  # may come from a bug: keep the traceback too
                msg += f" (details: {_log_traceback(args)})"
            print(f"dcube: error: {msg}", file=sys.stderr)
            return 2
        except Exception as exc:  # a bug: one line, the traceback in a file
            path = _log_traceback(args)
            where = f"The traceback is in {path}" if isinstance(path, Path) else f"There is {path}"
            print(f"dcube: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}. "
                  f"{where}; please report it.", file=sys.stderr)
            return 1

    handler.__name__, handler.__doc__ = fn.__name__, fn.__doc__
    return handler
