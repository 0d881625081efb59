"""Thin command-line entry point: `dcube run CONFIG`, the single steps, and `dcube demo`."""

from __future__ import annotations

import argparse
import os
import sys
import time

from dcube.config import ConfigError, RunConfig, apply_overrides, from_dict, load_config

DEMO_HELP = """D-Cube on PneumoniaMNIST (28 px): step-1 diffusion, KS layer selection, step-2
classifier, test metrics. Looks for pneumoniamnist.npz in $DCUBE_DATA_DIR, then
~/.cache/dcube, and downloads it there when absent."""


def _config(args) -> RunConfig:
    if getattr(args, "config", None):
        cfg = load_config(args.config, args.set)
    else:
        cfg = from_dict(apply_overrides({}, args.set))
    if getattr(args, "run_dir", None):
        cfg.run_dir = args.run_dir
    return cfg


def demo_config(quick: bool = False) -> RunConfig:
    """The demo: the defaults (PneumoniaMNIST, 28 px, tiny UNet), sized to ~10 min on 2 CPU cores."""
    values = {"run_dir": "runs/demo", "diffusion": {"epochs": 4}, "classifier": {"epochs": 4}}
    if quick:  # a smoke-sized demo (about a minute)
        values = {"run_dir": "runs/demo-quick",
                  "data": {"max_train": 600, "max_val": 200, "max_test": 300},
                  "diffusion": {"epochs": 3}, "classifier": {"epochs": 4}}
    return from_dict(values)


def cmd_predict(args) -> int:
    """0: every input predicted; 1: some inputs could not be read (named on stderr); 2: nothing to do."""
    from pathlib import Path

    from dcube.predict import NOTICE, predict_files

    out = Path(args.out) if args.out else Path(args.run_dir) / "predictions"
    try:
        rows, failed = predict_files(args.run_dir, args.inputs, out, args.batch_size, args.device, args.heatmaps)
    except (FileNotFoundError, ValueError) as exc:
        print(f"dcube: error: {exc}", file=sys.stderr)
        return 2
    for it in failed:
        print(f"dcube: cannot predict {it.path}: {it.error}", file=sys.stderr)
    print(f"predicted {len(rows)} image(s), {len(failed)} failed -> {out / 'predictions.csv'} ({NOTICE})")
    if not rows:
        return 2
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dcube", description="Diffusion hyper-features for medical image classification")
    sub = p.add_subparsers(dest="cmd", required=True)
    steps = {
        "run": ("all steps; each is skipped when its output exists", ("diffusion", "select", "classify", "evaluate")),
        "train-diffusion": ("step 1: class-conditional diffusion model", ("diffusion",)),
        "select-layers": ("KS selection of non-Gaussian layers", ("select",)),
        "train-classifier": ("step 2: the D-Cube classifier", ("classify",)),
        "evaluate": ("test metrics of the trained classifier", ("evaluate",)),
    }
    for name, (help_, _) in steps.items():
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML configuration (see README: configuration reference)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set classifier.epochs=5")
        sp.add_argument("--run-dir", help="override run_dir")
    from dcube import cli_generate, cli_latent  # synthesis (issue 3) and latent diffusion (issue 5)

    cli_generate.register(sub)
    cli_latent.register(sub)
    pp = sub.add_parser("predict", help="apply a trained run to new images (PNG/JPEG/TIFF/BMP/DICOM files, folders, CSV)")
    pp.add_argument("run_dir", help="a finished run directory (dcube run)")
    pp.add_argument("inputs", nargs="+", help="image or DICOM files, folders (recursive) or CSVs with a 'path' column")
    pp.add_argument("--out", help="output folder for predictions.csv/.json (default RUN_DIR/predictions)")
    pp.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    pp.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    pp.add_argument("--heatmaps", nargs="?", type=int, const=20, default=0, metavar="N",
                    help="Grad-CAM and diffusion-evidence overlays of the first N images (default N: 20)")
    pp.set_defaults(handler=cmd_predict)
    dp = sub.add_parser("demo", help=DEMO_HELP)
    dp.add_argument("--quick", action="store_true", help="a one-minute smoke version")
    dp.add_argument("--run-dir")
    dp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    from dcube.utils import dist

    if not dist.is_main():  # several processes (accelerate launch / torchrun): rank 0 reports
        sys.stdout = open(os.devnull, "w")
    handler = getattr(args, "handler", None) or getattr(args, "func", None)
    if handler is not None:  # subcommands registered by cli_generate / cli_latent
        return handler(args)

    from dcube.pipeline import run

    try:
        if args.cmd == "demo":
            cfg = demo_config(args.quick)
            if args.set:
                cfg = from_dict(apply_overrides(cfg.to_dict(), args.set))
            if args.run_dir:
                cfg.run_dir = args.run_dir
            t0 = time.time()
            out = run(cfg)
            print(f"demo finished in {time.time() - t0:.0f} s; run directory: {cfg.run_dir}")
            t = out["test"]
            print(f"PneumoniaMNIST test: AUC {t['auc']:.3f}  ACC {t['accuracy']:.3f}   "
                  "(MedMNIST v2 ResNet-18 28 px: AUC 0.944, ACC 0.854)")
            return 0
        cfg = _config(args)
        run(cfg, steps[args.cmd][1])
        return 0
    except (ConfigError, FileNotFoundError) as exc:
        print(f"dcube: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # data errors etc.: one clear line, not a traceback
        from dcube.data import DataError

        if isinstance(exc, DataError):
            print(f"dcube: data error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
