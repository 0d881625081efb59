"""Thin command-line entry point, one module per command group:

* :mod:`.run` -- ``dcube run CONFIG``, the single steps, ``demo``, ``config``;
* :mod:`.predict` -- ``dcube predict RUN_DIR INPUT...``;
* :mod:`.generate` -- ``synthesize``, ``fidelity``, ``train-baseline``;
* :mod:`.latent` -- the latent-diffusion method's commands.

Every command loads its config the same way (:func:`.common.config_from_args`) and reports errors
the same way (:func:`.common.guard`): one line, exit code 2 for a user error, a log file for a bug.
"""

from __future__ import annotations

import argparse
import os
import sys

from dcube import __version__
from dcube.cli.run import demo_config  # noqa: F401  (the demo's config, for tests and docs)


def parser() -> argparse.ArgumentParser:
    from dcube.cli import generate, latent, predict, run
    from dcube.cli.common import Formatter

    p = argparse.ArgumentParser(prog="dcube", description="Diffusion hyper-features for medical image classification",
                                formatter_class=Formatter)
    p.add_argument("--version", action="version", version=f"dcube {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    run.register(sub)
    predict.register(sub)
    generate.register(sub)
    latent.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args._argv = argv
    from dcube.utils import dist

    if not dist.is_main():  # several processes (accelerate launch / torchrun): rank 0 reports
        sys.stdout = open(os.devnull, "w")
    return args.func(args)
