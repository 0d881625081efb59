"""One process per run directory: an advisory ``fcntl.flock`` on ``run_dir/.lock``.

The kernel drops the lock when its process dies (also on SIGKILL), so a stale lock from a dead
process never blocks: the next run simply takes it. The file holds the owner's pid, for the message
a second process gets. Taking the lock again in the process that holds it is a no-op (a ``Run`` made
twice in one program, tests). With several processes of one launch (torchrun / accelerate) rank 0
holds it for all of them. ``filelock`` would do the same job; fcntl is in the standard library.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # resolved run dir -> fd of its lock file, in this process


class RunDirLocked(RuntimeError):
    """Another live process works in this run directory."""


def lock_run_dir(run_dir: str | Path) -> None:
    from dcube.utils import dist

    if not dist.is_main():
        return
    key = str(Path(run_dir).resolve())
    if key in _held:
        return
    path = Path(key) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunDirLocked(f"run_dir: {run_dir} is in use by another dcube process (pid {owner}); wait for "
                           f"it to finish, stop it, or choose another run_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held[key] = fd


def unlock_run_dir(run_dir: str | Path) -> None:
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
