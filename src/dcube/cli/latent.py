"""CLI of the latent-diffusion method: ``register(subparsers)`` adds its subcommands.

    dcube train-autoencoder CONFIG            AutoencoderKL (or import latent.autoencoder); PSNR/SSIM
    dcube train-latent-diffusion CONFIG       step 1 on the scaled latents (trains the autoencoder first)
    dcube classify-zero-shot CONFIG           zero-shot diffusion classifier (+ error-map overlays)
    dcube analyze CONFIG                      timestep x layer probes, zero-shot per t, recommended set
    dcube train-latent-head CONFIG            linear probe + MLP head (--finetune: end to end)

Every handler returns an exit code; errors are reported as :func:`dcube.cli.common.guard` says.
"""

from __future__ import annotations

from dcube.cli.common import Formatter, add_config_args, config_from_args, guard


def _run(args):
    from dcube.latent.run import Latent

    return Latent(config_from_args(args), getattr(args, "model", None))


@guard
def cmd_train_autoencoder(args) -> int:
    with _run(args) as r:
        recon = r.train_autoencoder()
    print(f"autoencoder reconstruction (held-out): PSNR {recon.get('psnr', float('nan')):.2f} dB, "
          f"SSIM {recon.get('ssim', float('nan')):.3f}")


@guard
def cmd_train_latent_diffusion(args) -> int:
    with _run(args) as r:
        r.train_autoencoder()
        print(f"latent step-1 model: {r.train_diffusion()}")


@guard
def cmd_classify_zero_shot(args) -> int:
    from dcube.diffusion.zeroshot import Adaptive
    from dcube.evaluate import format_table

    given = {k: v for k, v in (("first_round", args.first_round), ("drop_z", args.drop_z)) if v is not None}
    adaptive = Adaptive(**given) if args.adaptive else None
    names = ("trials", "timesteps", "t_min", "t_max", "weighting", "temperature", "batch_size")
    options = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    with _run(args) as r:
        out = r.zero_shot(args.split, adaptive, args.max_images, args.error_maps, options=options)
    print(format_table(out["metrics"], title=f"zero-shot, {args.split} ({out['n_images']} images)"))
    print(f"{out['images_per_s']:.2f} images/s, {out['evaluations_per_image']:.1f} denoiser inputs per image")


@guard
def cmd_analyze(args) -> int:
    from dcube.latent.analysis import AnalysisOptions

    names = ("timesteps", "images", "zs_images", "zs_trials", "folds", "top_layers")
    opts = AnalysisOptions(**{k: getattr(args, k) for k in names if getattr(args, k) is not None})
    with _run(args) as r:
        res = r.analyze(opts)
    rec = res["recommended"]
    print(f"recommended: t={rec['timestep']}, layers={rec['layers']} "
          f"(best cell {res['best']['layer']}@{res['best']['timestep']}: balanced acc "
          f"{res['best']['balanced_accuracy']:.3f}); {r.ldir / 'analysis' / 'analysis.png'}")
    print("use with the D-Cube feature pipeline: " + " ".join(f"--set {o}" for o in res["feature_overrides"]))


@guard
def cmd_train_latent_head(args) -> int:
    with _run(args) as r:
        out = r.head(args.epochs)
        for k in ("linear_probe", "mlp_head"):
            t = out[k]["test"]
            print(f"{k}: test ACC {t['accuracy']:.3f}  AUC {t['auc'] if t['auc'] is None else round(t['auc'], 3)}")
        if args.finetune:
            t = r.finetune(epochs=args.finetune_epochs)["test"]
            print(f"fine-tuned: test ACC {t['accuracy']:.3f}  AUC {t['auc'] if t['auc'] is None else round(t['auc'], 3)}")


def _common(sp, model: bool = False):
    add_config_args(sp, "YAML configuration (the 'latent' section: docs/latent.md)")
    if model:
        sp.add_argument("--model", help="step-1 ema.safetensors (default run_dir/latent/diffusion/ema.safetensors; "
                                        "a pixel-space model works too)")


def register(subparsers) -> dict:
    """Add the latent subcommands to an argparse subparsers object; each sets ``func``."""
    handlers = {}

    def add(name, help_, fn, model=False):
        sp = subparsers.add_parser(name, help=help_, description=help_, formatter_class=Formatter)
        _common(sp, model)
        sp.set_defaults(func=fn)
        handlers[name] = (sp, fn)
        return sp

    add("train-autoencoder", "latent diffusion: train (or import) the AutoencoderKL", cmd_train_autoencoder)
    add("train-latent-diffusion", "latent diffusion: step 1 on the autoencoder's latents", cmd_train_latent_diffusion)
    sp = add("classify-zero-shot", "zero-shot diffusion classifier (lowest class-conditional denoising error)",
             cmd_classify_zero_shot, model=True)
    sp.add_argument("--split", default="test", choices=("train", "val", "test"), help="the split classified")
    sp.add_argument("--adaptive", action="store_true", help="drop clearly worse classes after a first round")
    sp.add_argument("--first-round", type=int, metavar="K", help="--adaptive: trials before dropping (default: 4)")
    sp.add_argument("--drop-z", type=float, metavar="Z",
                    help="--adaptive: drop a class whose paired error excess exceeds Z standard errors (default: 2.0)")
    # the trial options' defaults are ZeroShotOptions'
    sp.add_argument("--trials", type=int, metavar="K",
                    help="(t, noise) pairs per image, shared by all classes (default: 16)")
    sp.add_argument("--timesteps", type=int, nargs="+", metavar="T",
                    help="the trials' timesteps, cycled over --trials (default: evenly spaced in [--t-min, --t-max])")
    sp.add_argument("--t-min", type=int, metavar="T", help="smallest evenly spaced timestep (default: 50)")
    sp.add_argument("--t-max", type=int, metavar="T", help="largest evenly spaced timestep (default: 950)")
    sp.add_argument("--weighting", choices=("uniform", "min_snr"), help="trial weights (default: uniform)")
    sp.add_argument("--temperature", type=float, help="scores = softmax(-mean error / temperature) (default: 1.0)")
    sp.add_argument("--batch-size", type=int, help="denoiser inputs per forward pass (default: 256)")
    sp.add_argument("--max-images", type=int, help="a stratified subset of the split")
    sp.add_argument("--error-maps", type=int, default=0, metavar="N",
                    help="write error-map overlays for N images of each class")
    sp = add("analyze", "timestep x layer linear probes + zero-shot accuracy per t -> recommended (layers, t)",
             cmd_analyze, model=True)
    # the defaults are AnalysisOptions' and Adaptive's (tests/latent: the help says them); None = the default
    sp.add_argument("--timesteps", type=int, nargs="+", metavar="T", help="the timesteps of the probe grid (default: 10 50 100 200 400 600 800)")
    sp.add_argument("--images", type=int, help="training images the probes are fitted on, stratified (default: 512)")
    sp.add_argument("--zs-images", type=int, help="training images of the zero-shot accuracy per t (default: 128)")
    sp.add_argument("--zs-trials", type=int, help="noise draws per t for it (default: 4)")
    sp.add_argument("--folds", type=int, help="probe cross-validation folds (default: 5)")
    sp.add_argument("--top-layers", type=int, help="layers in the recommended set (default: 2)")
    sp = add("train-latent-head", "linear probe and MLP head on the recommended features", cmd_train_latent_head,
             model=True)
    sp.add_argument("--finetune", action="store_true", help="also fine-tune denoiser + head end to end")
    sp.add_argument("--epochs", type=int, help="MLP head epochs (default: 60)")
    sp.add_argument("--finetune-epochs", type=int, help="--finetune: epochs (default: 3)")
    return handlers
