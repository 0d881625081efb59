"""The latent-diffusion method, a plug-in of the one orchestrator (:class:`dcube.run.Run`: the run
directory, its lock and staleness checks, run.json, the data, resume, cached tensors). Each stage is
skipped when its output exists.

run_dir/latent/
  config.yaml                      the resolved configuration
  autoencoder/                     last.safetensors (resume), autoencoder.safetensors, recon.json, recon.png
  latents/<split>.safetensors      cached scaled latents (keyed by the autoencoder's sha256)
  diffusion/                       step 1 in latent space: ema.safetensors, latent.json, samples.png
  zeroshot/<split>[_adaptive].json metrics, images/s, per-image scores; error_maps/*.png
  analysis/                        analysis.json (grid, zero-shot per t, recommended set), analysis.png
  head/                            head.json (linear probe + MLP head), mlp.safetensors
  finetune/                        finetune.json, model.safetensors
The split (``splits.csv``) is the one of ``run_dir`` (shared with the D-Cube pipeline).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dcube.config import ConfigError, RunConfig
from dcube.data.splits import stratified_subsample
from dcube.diffusion.schedule import ddpm_scheduler
from dcube.diffusion.zeroshot import Adaptive, ZeroShotOptions, as_adaptive, classify_zero_shot
from dcube.evaluate import compute_metrics
from dcube.evaluate.record import evaluation_record
from dcube.latent.autoencoder import LATENT_CHANNELS, import_autoencoder, load_codec, train_autoencoder
from dcube.preflight import check_device
from dcube.run import Method
from dcube.utils.io import load_tensors, read_json, save_tensors, sha256_file, write_json
from dcube.utils.runtime import seed_everything

class Latent(Method):
    """The latent-diffusion method's stages (the CLI calls them one by one, with their options)."""

    STAGES = {"autoencoder": "train_autoencoder", "diffusion": "train_diffusion", "zero_shot": "zero_shot",
              "analyze": "analyze", "head": "head", "finetune": "finetune"}
    CONFIG_FILE = "latent/config.yaml"
    # which output each part of the config produced (relative to run_dir; see dcube.run)
    MADE = {"data": "latent/autoencoder/autoencoder.safetensors", "latent.ae_": "latent/autoencoder/autoencoder.safetensors",
            "latent.autoencoder": "latent/autoencoder/autoencoder.safetensors",
            "diffusion": "latent/diffusion/ema.safetensors"}

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """A pretrained pair starts a run: ``latent.autoencoder`` and ``diffusion.init_from`` (a latent step-1
        model of this backbone and preset whose latents have this autoencoder's shape), checked before anything
        trains; with an imported autoencoder the latent shape is checked once it is loaded."""
        check_device(cfg.device)
        if cfg.diffusion.init_from is None:
            return
        lc, d = cfg.latent, cfg.data
        shape = None if lc.autoencoder else (LATENT_CHANNELS, d.image_size // 2 ** (len(lc.ae_channels) - 1))
        cls._check_init_from(cfg, shape)

    @staticmethod
    def _check_init_from(cfg: RunConfig, shape: tuple[int, int] | None) -> None:
        """ConfigError naming diffusion.init_from when its model is not this run's latent denoiser."""
        from dcube.diffusion.backbone import check_backbone, read_meta

        try:
            if shape is None:  # only the architecture and preset can be known yet
                meta = read_meta(cfg.diffusion.init_from)
                shape = (meta["in_channels"], meta["image_size"])
            check_backbone(cfg.diffusion.init_from, cfg.diffusion, *shape)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"{exc} (the latent method: a latent step-1 model with {shape[0]} latent channel(s) "
                              f"at {shape[1]} px, e.g. another run's latent/diffusion/ema.safetensors)"
                              if shape else str(exc)) from exc

    def __init__(self, cfg: RunConfig, model_path: str | Path | None = None):
        super().__init__(cfg)
        self.lc = cfg.latent
        self.ldir = self.dir / "latent"
        self.model_path = Path(model_path) if model_path else self.ldir / "diffusion" / "ema.safetensors"
        self._codec = self._model = None

    # ------------------------------------------------------------------ inputs
    @property
    def ae_path(self) -> Path:
        return self.ldir / "autoencoder" / "autoencoder.safetensors"

    def train_autoencoder(self) -> dict:
        """Train (or import ``latent.autoencoder``) once; returns the reconstruction metrics."""
        def work():
            d = self.data
            heldout = d.val.images if len(d.val.images) else d.test.images
            if self.lc.autoencoder:
                import_autoencoder(self.lc, self.lc.autoencoder, d.train.images, self.ae_path.parent, self.device, heldout)
            else:
                train_autoencoder(self.lc, d.train.images, self.ae_path.parent, self.cfg.seed, self.device, heldout)

        if not self.ae_path.exists():
            self.timed("latent_autoencoder", work)
        return load_tensors(self.ae_path)[1].get("recon", {})

    def codec(self):
        if self._codec is None:
            if not self.ae_path.exists():
                raise FileNotFoundError(f"no autoencoder at {self.ae_path}: run 'dcube train-autoencoder' first")
            self._codec = load_codec(self.ae_path, self.device)
        return self._codec

    def latents(self, split: str) -> torch.Tensor:
        """Scaled latents of a split, cached on disk (recomputed when the autoencoder changes)."""
        images = getattr(self.data, split).images
        key = {"autoencoder": sha256_file(self.ae_path), "n": len(images)}
        return self.run.cached(self.ldir / "latents" / f"{split}.safetensors", key, lambda: {
            "z": self.codec().encode_all(images, device=self.device, desc=f"encoding {split}")})["z"]

    # ------------------------------------------------------------------ step 1 in latent space
    def train_diffusion(self) -> Path:
        from dcube.latent.diffusion import train_latent_diffusion

        def work():
            d = self.data
            z = self.latents("train")
            if self.cfg.diffusion.init_from:  # the loaded autoencoder's latent shape against the pretrained denoiser
                self._check_init_from(self.cfg, (z.shape[1], z.shape[-1]))
            return train_latent_diffusion(self.cfg.diffusion, self.codec(), z, d.train.labels,
                                          len(d.class_names), self.model_path.parent, self.cfg.seed, self.device,
                                          d.class_names)

        return self.run.stage("latent_diffusion", self.model_path, work, label="latent diffusion")

    def model(self):
        """(denoiser, diffusion config, codec, scheduler) of the step-1 model (latent or pixel)."""
        from dcube.latent.diffusion import load_model

        if self._model is None:
            if not self.model_path.exists():
                raise FileNotFoundError(f"no step-1 model at {self.model_path}: run 'dcube train-latent-diffusion' "
                                        "first (or pass --model)")
            model, dcfg, codec = load_model(self.model_path, self.device)
            self._model = (model, dcfg, codec, ddpm_scheduler(dcfg))
        return self._model

    def inputs(self, split: str) -> torch.Tensor:
        """What the denoiser sees: latents (latent model) or the images (pixel-space model)."""
        codec = self.model()[2]
        return getattr(self.data, split).images if codec.is_identity else self.latents(split)

    # ------------------------------------------------------------------ zero-shot
    def zero_shot(self, split: str = "test", adaptive: Adaptive | bool | None = None, max_images: int | None = None,
                  error_maps: int = 0, tag: str = "", options: dict | None = None) -> dict:
        """Zero-shot metrics of a split (or a stratified subset); `adaptive`: class dropping (an
        :class:`~dcube.diffusion.zeroshot.Adaptive`, True for its defaults); `options`: fields of
        :class:`~dcube.diffusion.zeroshot.ZeroShotOptions`; `tag` suffixes the output file."""
        opts = ZeroShotOptions(**(options or {}))
        model, dcfg, codec, sched = self.model()
        adaptive = as_adaptive(adaptive)
        s, names = getattr(self.data, split), self.data.class_names
        idx = torch.arange(len(s.labels))
        if max_images is not None:
            idx = torch.as_tensor(stratified_subsample(s.labels.numpy(), max_images, [self.cfg.seed, 13]))
        x, y = self.inputs(split)[idx], s.labels[idx]
        res = classify_zero_shot(model, sched, x, opts, self.cfg.seed, self.device, adaptive)
        metrics = compute_metrics(y.numpy(), res.probs.numpy(), names)
        out_dir = self.ldir / "zeroshot"
        out = {"split": split, "adaptive": adaptive is not None, "n_images": len(idx), "trials": opts.trials,
               "first_round": adaptive.first_round if adaptive else None,
               "drop_z": adaptive.drop_z if adaptive else None, "weighting": opts.weighting, "options": vars(opts),
               "seconds": res.seconds, "images_per_s": res.images_per_s, "evaluations": res.evaluations,
               "evaluations_per_image": res.evaluations / max(len(idx), 1), "metrics": metrics,
               "model": str(self.model_path), "latent": not codec.is_identity,
               "ids": [s.ids[i] for i in idx.tolist()], "probs": res.probs.tolist(), "labels": y.tolist()}
        if error_maps:
            from dcube.latent.errormaps import write_error_maps

            imgs = s.images[idx]
            out["error_maps"] = write_error_maps(
                model, sched, codec, imgs, y, res.probs, names, out_dir / "error_maps", error_maps,
                seed=self.cfg.seed, device=self.device, ids=[s.ids[i] for i in idx.tolist()])
        name = f"{split}{'_adaptive' if adaptive else ''}{tag}"
        write_json(out_dir / f"{name}.json", out)
        if split == "test":  # the record every evaluating command writes: `dcube compare` pairs it with any run's
            write_json(out_dir / f"metrics{name[4:]}.json", {
                **evaluation_record(y.numpy(), res.probs.numpy(), out["ids"], names, self.cfg.seed),
                "method": "latent zero-shot", "adaptive": out["adaptive"], "seed": self.cfg.seed})
        return out

    # ------------------------------------------------------------------ analysis, heads
    def analyze(self, opts=None) -> dict:
        """The timestep x layer analysis (`opts`: :class:`dcube.latent.analysis.AnalysisOptions`)."""
        from dcube.latent.analysis import analyze, plot_analysis

        path = self.ldir / "analysis" / "analysis.json"

        def work():
            model, _, _, sched = self.model()
            t0 = time.time()
            res = analyze(model, sched, self.inputs("train"), self.data.train.labels, opts, self.cfg.seed, self.device)
            res["seconds"] = time.time() - t0
            plot_analysis(res, path.parent / "analysis.png")
            write_json(path, res)
            return res

        return self.run.stage("latent_analysis", path, work, done=lambda: read_json(path), label="analysis")

    def head(self, epochs: int | None = None) -> dict:
        """Linear probe and MLP head (`epochs`: HEAD_EPOCHS) on the recommended (layers, t); test + validation
        metrics."""
        path = self.ldir / "head" / "head.json"
        return self.run.stage("latent_head", path, lambda: self._head(path, epochs), done=lambda: read_json(path),
                              label="latent head")

    def _head(self, path: Path, epochs: int | None) -> dict:
        from dcube.latent.head import HEAD_EPOCHS, features, linear_probe, train_mlp_head

        rec = self.analyze()["recommended"]
        model, _, _, sched = self.model()
        d, names = self.data, self.data.class_names
        f = {s: features(model, self.inputs(s), rec["layers"], rec["timestep"], sched, self.cfg.seed, self.device)
             for s in ("train", "val", "test")}
        lin = linear_probe(f["train"].numpy(), d.train.labels.numpy(), f["test"].numpy(), self.cfg.seed)
        mlp, info = train_mlp_head(f["train"], d.train.labels, f["val"], d.val.labels, len(names),
                                   epochs or HEAD_EPOCHS, self.cfg.seed)
        with torch.no_grad():
            probs = mlp(f["test"]).softmax(1)
        save_tensors(path.parent / "mlp.safetensors", mlp.state_dict(),
                     {"layers": rec["layers"], "timestep": rec["timestep"], "dim": f["train"].shape[1]})
        out = {"recommended": rec, "feature_dim": f["train"].shape[1],
               "linear_probe": {"test": compute_metrics(d.test.labels.numpy(), lin, names)},
               "mlp_head": {"test": compute_metrics(d.test.labels.numpy(), probs.numpy(), names), **info}}
        write_json(path, out)
        return out

    def finetune(self, tag: str = "", epochs: int | None = None) -> dict:
        """End-to-end fine-tuning from the MLP head (`epochs`: FINETUNE_EPOCHS); `tag` suffixes the output
        directory."""
        path = self.ldir / f"finetune{tag}" / "finetune.json"
        return self.run.stage(f"latent_finetune{tag}", path, lambda: self._finetune(path, epochs),
                              done=lambda: read_json(path), label="fine-tune")

    def _finetune(self, path: Path, epochs: int | None) -> dict:
        from dcube.latent.diffusion import load_model
        from dcube.latent.head import FINETUNE_EPOCHS, FINETUNE_LR, HEAD_HIDDEN, HEAD_LR, FineTuneModel, MLPHead, finetune
        epochs = epochs or FINETUNE_EPOCHS
        self.head()
        tensors, meta = load_tensors(self.ldir / "head" / "mlp.safetensors")
        model, dcfg, _ = load_model(self.model_path, self.device)  # a fresh copy: this one is trained
        mlp = MLPHead(meta["dim"], model.num_classes, HEAD_HIDDEN)
        mlp.load_state_dict(tensors)
        ft = FineTuneModel(model, mlp, meta["layers"], meta["timestep"], ddpm_scheduler(dcfg))
        d = self.data
        seed_everything(self.cfg.seed)  # here, after the modules above drew their initial weights
        t0 = time.time()
        info = finetune(ft, self.inputs("train"), d.train.labels, self.inputs("val"), d.val.labels, epochs,
                        self.cfg.seed, self.device)
        probs = ft.predict(self.inputs("test"), self.cfg.seed, device=self.device)
        save_tensors(path.parent / "model.safetensors", ft.state_dict(), meta)
        out = {"layers": meta["layers"], "timestep": meta["timestep"], "seconds": time.time() - t0,
               "finetune_lr": FINETUNE_LR, "head_lr": HEAD_LR, "epochs": epochs,
               "test": compute_metrics(d.test.labels.numpy(), probs.numpy(), d.class_names), **info}
        write_json(path, out)
        return out
