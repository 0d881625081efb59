"""The pipeline commands: ``dcube run CONFIG``, the single steps, ``dcube demo`` and ``dcube config``."""

from __future__ import annotations

import time

import yaml

from dcube.cli.common import Formatter, add_config_args, config_from_args, guard
from dcube.config import RunConfig, apply_overrides, from_dict

DEMO_HELP = """D-Cube on PneumoniaMNIST (28 px): step-1 diffusion, KS layer selection, step-2
classifier, test metrics. Looks for pneumoniamnist.npz in $DCUBE_DATA_DIR, then
~/.cache/dcube, and downloads it there when absent."""

STEPS = {
    "run": ("all steps; each is skipped when its output exists", ("diffusion", "select", "classify", "evaluate")),
    "train-diffusion": ("step 1: class-conditional diffusion model", ("diffusion",)),
    "select-layers": ("KS selection of non-Gaussian layers", ("select",)),
    "train-classifier": ("step 2: the D-Cube classifier", ("classify",)),
    "evaluate": ("test metrics of the trained classifier", ("evaluate",)),
}


def demo_config(quick: bool = False) -> RunConfig:
    """The demo: the defaults (PneumoniaMNIST, 28 px, tiny UNet), sized to ~10 min on 2 CPU cores."""
    values = {"run_dir": "runs/demo", "diffusion": {"epochs": 4}, "classifier": {"epochs": 4}}
    if quick:  # a smoke-sized demo (about a minute)
        values = {"run_dir": "runs/demo-quick",
                  "data": {"max_train": 600, "max_val": 200, "max_test": 300},
                  "diffusion": {"epochs": 3, "sample_grid": False}, "classifier": {"epochs": 4}}
    return from_dict(values)


@guard
def cmd_steps(args) -> int:
    from dcube.pipeline import run

    cfg = config_from_args(args)
    if run(cfg, STEPS[args.cmd][1]) is not None:  # evaluate ran: the report is rewritten from its files
        _report(cfg.run_dir)


def _report(run_dir) -> None:
    from dcube.report import write_report

    print(f"report: {write_report(run_dir, heatmaps=2)}")


@guard
def cmd_demo(args) -> int:
    from dcube.pipeline import run

    cfg = demo_config(args.quick)
    if args.set:
        cfg = from_dict(apply_overrides(cfg.to_dict(), args.set))
    if args.run_dir:
        cfg.run_dir = args.run_dir
    args._run_dir = cfg.run_dir
    t0 = time.time()
    out = run(cfg)
    _report(cfg.run_dir)
    print(f"demo finished in {time.time() - t0:.0f} s; run directory: {cfg.run_dir}")
    t = out["test"]
    print(f"PneumoniaMNIST test: AUC {t['auc']:.3f}  ACC {t['accuracy']:.3f}   "
          "(MedMNIST v2 ResNet-18 28 px: AUC 0.944, ACC 0.854)")


@guard
def cmd_config(args) -> int:
    """Print the full configuration: the defaults, or CONFIG with --set applied, as YAML."""
    print(yaml.safe_dump(config_from_args(args).to_dict(), sort_keys=False), end="")


@guard
def cmd_pretrain(args) -> int:
    """Train a step-1 backbone on unlabelled images, to start any run's step 1 from (diffusion.init_from)."""
    from dcube.diffusion.backbone import pretrain
    from dcube.preflight import check_run
    from dcube.utils.runtime import pick_device

    cfg = config_from_args(args)
    check_run(cfg)
    out = pretrain(cfg, args.pool, args.out, with_train=args.with_train, device=pick_device(cfg.device))
    print(f"backbone: {out}\nstart a run from it with: --set diffusion.init_from={out}")


def register(sub) -> None:
    for name, (help_, _) in STEPS.items():
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=Formatter)
        add_config_args(sp)
        sp.set_defaults(func=cmd_steps)
    dp = sub.add_parser("demo", help="D-Cube on PneumoniaMNIST, end to end", description=DEMO_HELP,
                        formatter_class=Formatter)
    dp.add_argument("--quick", action="store_true", help="a one-minute smoke version")
    dp.add_argument("--run-dir", help="override run_dir (default runs/demo, runs/demo-quick)")
    dp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    dp.set_defaults(func=cmd_demo)
    pp = sub.add_parser("pretrain", help="train a step-1 backbone on unlabelled images (diffusion.init_from)",
                        description=cmd_pretrain.__doc__, formatter_class=Formatter)
    add_config_args(pp)
    pp.add_argument("--pool", required=True, help="unlabelled images: a folder, a CSV with a path column, or an npz")
    pp.add_argument("--out", required=True, help="the backbone file to write (.safetensors)")
    pp.add_argument("--with-train", action="store_true", help="the config's training images join the pool, "
                    "without labels")
    pp.set_defaults(func=cmd_pretrain)
    cp = sub.add_parser("config", help="print the full configuration (defaults, or CONFIG + --set) as YAML",
                        description=cmd_config.__doc__, formatter_class=Formatter)
    add_config_args(cp)
    cp.set_defaults(func=cmd_config)
