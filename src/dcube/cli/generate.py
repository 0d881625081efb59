"""Subcommands for synthetic images: `synthesize`, `fidelity`, `train-baseline`.

Wiring: ``register(subparsers)`` adds the three parsers; each sets ``func`` (one of
:func:`cmd_synthesize`, :func:`cmd_fidelity`, :func:`cmd_train_baseline`), which takes the
parsed args and returns the exit code.
"""

from __future__ import annotations

from pathlib import Path

from dcube.cli.common import Formatter, add_config_args, config_from_args, guard

GRID = "real_vs_generated.png"


def _common(sp):
    add_config_args(sp, "YAML configuration of the run whose step-1 model is used")


def register(subparsers) -> None:
    sp = subparsers.add_parser("synthesize", help="generate class-conditional images from the step-1 model", description="generate class-conditional images from the step-1 model", formatter_class=Formatter)
    _common(sp)
    how = sp.add_mutually_exclusive_group(required=True)
    how.add_argument("--per-class", type=int, metavar="N", help="N images of every class")
    how.add_argument("--balance", nargs="?", type=float, const=1.0, metavar="RATIO",
                     help="top every class up to RATIO x the largest training class (default 1: equal counts)")
    sp.add_argument("--out", help="output folder (default RUN_DIR/synthetic)")
    sp.add_argument("--checkpoint", help="step-1 weights (default RUN_DIR/diffusion/ema.safetensors)")
    sp.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="sampler")
    sp.add_argument("--steps", type=int, help="DDIM steps (default 50); DDPM always runs all timesteps")
    sp.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale (0 = off)")
    sp.add_argument("--seed", type=int, help="sampling seed (default: the run's seed)")
    sp.add_argument("--batch-size", type=int, default=256, help="images per sampling batch")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing set in --out")
    sp.set_defaults(func=cmd_synthesize)

    fp = subparsers.add_parser("fidelity", help="per-class FID/KID of a synthetic set vs the training images", description="per-class FID/KID of a synthetic set vs the training images", formatter_class=Formatter)
    _common(fp)
    fp.add_argument("--synthetic", help="synthetic set folder (default RUN_DIR/synthetic)")
    fp.add_argument("--extractor", choices=("efficientnet-lite0", "inception"), default="efficientnet-lite0",
                    help="feature network of the FID")
    fp.add_argument("--weights", help="Inception-v3 .safetensors weights (extractor inception)")
    fp.add_argument("--size", type=int, default=224, help="input size of the EfficientNet extractor")
    fp.set_defaults(func=cmd_fidelity)

    bp = subparsers.add_parser("train-baseline", help="a plain CNN on real (+ synthetic) training images", description="a plain CNN on real (+ synthetic) training images", formatter_class=Formatter)
    _common(bp)
    bp.add_argument("--model", choices=("resnet18", "resnet50", "efficientnet-lite0"), default="resnet18",
                    help="the CNN")
    bp.add_argument("--epochs", type=int, default=20, help="training epochs")
    bp.add_argument("--batch-size", type=int, default=64, help="images per step")
    bp.add_argument("--lr", type=float, default=1e-3, help="learning rate (Adam)")
    bp.add_argument("--lr-milestones", type=float, nargs="*", default=[],
                    help="fractions of the epochs where the LR drops x0.1 (MedMNIST v2: 0.5 0.75)")
    bp.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights (0 = off)")
    bp.add_argument("--synthetic", help="a synthetic set folder added to the TRAINING split only")
    bp.add_argument("--synthetic-ratio", type=float, help="at most RATIO x (real training images) synthetic ones")
    bp.add_argument("--out", help="output folder (default RUN_DIR/baseline-<model>[-synthetic])")
    bp.set_defaults(func=cmd_train_baseline)


def _load(args):
    cfg = config_from_args(args)
    from dcube.data import load_data
    from dcube.utils.runtime import pick_device

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, run_dir, load_data(cfg.data, cfg.seed, run_dir), pick_device(cfg.device)


@guard
def cmd_synthesize(args) -> int:
    """Write RUN_DIR/synthetic/<class>/*.png + manifest.csv and RUN_DIR/real_vs_generated.png."""
    from dcube.generate import balance_counts, per_class_counts, synthesize
    from dcube.generate.grid import save_real_vs_generated
    from dcube.generate.synthetic import train_fingerprint

    cfg, run_dir, data, device = _load(args)
    counts = (per_class_counts(data.num_classes, args.per_class) if args.per_class is not None
              else balance_counts(data.train.labels.bincount(minlength=data.num_classes).tolist(), args.balance))
    ckpt = Path(args.checkpoint) if args.checkpoint else run_dir / "diffusion" / "ema.safetensors"
    if not ckpt.is_file():
        raise FileNotFoundError(f"no step-1 model at {ckpt}: run 'dcube train-diffusion' first")
    out = Path(args.out) if args.out else run_dir / "synthetic"
    print(f"[synthesize] {dict(zip(data.class_names, counts))} images -> {out}")
    synth = synthesize(ckpt, counts, out, data.class_names, train_fingerprint(data.train), sampler=args.sampler,
                       steps=args.steps, guidance=args.guidance, seed=cfg.seed if args.seed is None else args.seed,
                       batch_size=args.batch_size, device=device, overwrite=args.overwrite)
    if len(synth):
        save_real_vs_generated(data.train.images, data.train.labels, synth.images, synth.labels, data.class_names,
                               run_dir / GRID)
    print(f"[synthesize] {len(synth)} images in {synth.info['sampling_seconds']:.1f} s; manifest {out / 'manifest.csv'}")
    return 0


@guard
def cmd_fidelity(args) -> int:
    """Write RUN_DIR/fidelity.json: per-class FID/KID, train images vs the synthetic set."""
    from dcube.evaluate.fidelity import build_extractor, format_fidelity, per_class_fidelity
    from dcube.generate import load_synthetic
    from dcube.utils.io import write_json

    cfg, run_dir, data, device = _load(args)
    synth = load_synthetic(args.synthetic or run_dir / "synthetic")
    ext = build_extractor(args.extractor, args.weights, args.size)
    rep = per_class_fidelity(data.train.images, data.train.labels, synth.images, synth.labels, data.class_names,
                             ext, device=device, seed=cfg.seed)
    rep["synthetic"] = synth.info
    write_json(run_dir / "fidelity.json", rep)
    print(format_fidelity(rep))
    return 0


@guard
def cmd_train_baseline(args) -> int:
    """Write OUT/best.safetensors, history.json and metrics.json (test + val)."""
    from dcube.classify.baseline import BaselineConfig, train_baseline
    from dcube.classify.trainer import SELECT_METRIC
    from dcube.evaluate import compute_metrics, format_table, select_score
    from dcube.evaluate.record import evaluation_record
    from dcube.generate import load_synthetic
    from dcube.utils.io import write_json

    cfg, run_dir, data, device = _load(args)
    bcfg = BaselineConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          lr_milestones=tuple(args.lr_milestones), ema_decay=args.ema_decay, synthetic_ratio=args.synthetic_ratio)
    synth = load_synthetic(args.synthetic) if args.synthetic else None
    out = Path(args.out) if args.out else run_dir / f"baseline-{args.model}{'-synthetic' if synth else ''}"
    score = lambda y, p: select_score(compute_metrics(y, p, data.class_names), SELECT_METRIC)  # noqa: E731
    res = train_baseline(bcfg, data, out, score, seed=cfg.seed, synthetic=synth, device=device)
    # the same record as `dcube run`'s metrics.json: `dcube compare` pairs the two on the test images
    rec = evaluation_record(data.test.labels.numpy(), res["test_probs"].numpy(), data.test.ids, data.class_names,
                            cfg.seed, data.val.labels.numpy(), res["val_probs"].numpy())
    write_json(out / "metrics.json", {**rec, "best_epoch": res["best_epoch"], "n_train_real": res["n_train_real"],
                                      "n_train_synthetic": res["n_train_synthetic"], "seed": cfg.seed,
                                      "synthetic": synth.info if synth else None, "model": args.model})
    print(format_table(rec["test"], title=f"test metrics ({out})"))
    return 0
