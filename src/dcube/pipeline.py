"""The pixel-space D-Cube method, a plug-in of the one orchestrator (:class:`dcube.run.Run`: the run
directory, its lock and staleness checks, run.json, the data, resume). Each stage is skipped when its
output exists.

run_dir/
  config.yaml            resolved configuration
  run.json               seed, package versions, data hashes and sizes, wall time per stage
  splits.csv             (image folders / CSV) the split, reused on resume
  diffusion/             step 1: last.safetensors (resume), ema.safetensors, history.json, samples.png
  features/              selection.json, ks_pvalues.png, cached feature maps per split
  classifier/            step 2: last.safetensors (resume), best.safetensors (EMA, best on val), history.json;
                         subfeature=auto: candidates/<cnn>/ (one head per CNN) and subfeature.json (the choice)
  metrics.json           test metrics with 95 % bootstrap CIs (+ validation metrics of the chosen epoch),
                         per-image test and validation probabilities, calibration (temperature, ECE before/after, operating
                         point); confusion.png, roc.png, reliability.png; classifier/calibration.json
  classifier/curves.png  training curves
  report.html            everything above in one self-contained page (dcube.report); report_heatmaps/ its heat maps
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dcube.classify.trainer import (
    BEST,
    CHOICE,
    SELECT_METRIC,
    FeatureSplit,
    build_head,
    head_probabilities,
    resolve_subfeature,
    train_auto,
    train_classifier,
)
from dcube.config import ConfigError, RunConfig
from dcube.data.store import cat_images
from dcube.diffusion.schedule import ddpm_scheduler
from dcube.diffusion.trainer import load_denoiser, train_diffusion
from dcube.evaluate import compute_metrics, format_table, select_score
from dcube.evaluate.calibration import apply_temperature, calibrate, calibration_warning, plot_reliability
from dcube.evaluate.plots import plot_confusion, plot_curves, plot_roc
from dcube.evaluate.record import evaluation_record
from dcube.features import extract
from dcube.features.cache import FeatureWriter, load_features, save_features
from dcube.features.ks import plot_pvalues, select_ks_map
from dcube.features.probe import validation_probe
from dcube.generate import MANIFEST
from dcube.preflight import check_run
from dcube.run import Method
from dcube.utils import dist
from dcube.utils.io import load_checkpoint, read_json, sha256_file, write_json
from dcube.utils.rows import reader_workers

STAGES = ("diffusion", "select", "classify", "evaluate")
MODEL_FILES = ("diffusion/ema.safetensors", "classifier/best.safetensors")  # fingerprinted in run.json
PROBE_IMAGES = 512  # diffusion.epochs=auto: training images the validation probe is fitted on (stratified)
KS_IMAGES = 256  # training images (a seeded sample) the KS layer selection reads


class DCube(Method):
    """The pixel-space D-Cube method: its stages on the run directory of :class:`dcube.run.Run`."""

    STAGES = {"diffusion": "train_diffusion", "select": "select_layers", "classify": "train_classifier",
              "evaluate": "evaluate"}
    # which output each config section produced: a section may change until its output exists
    MADE = {"data": "diffusion/ema.safetensors", "diffusion": "diffusion/ema.safetensors",
            "features": "features/selection.json", "classifier": "classifier/best.safetensors",
            "data.": "classifier/best.safetensors"}  # also the head's (the CNN-only arm has no step 1)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        check_run(cfg)

    def check_data(self, data) -> None:
        if self.cfg.classifier.target_sensitivity is not None and len(data.class_names) != 2:
            raise ConfigError(f"classifier.target_sensitivity: needs a binary task, this data has "
                              f"{len(data.class_names)} classes ({', '.join(data.class_names[:5])}); remove the key")

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self._train = None  # training split with synthetic images, when configured

    # -- step 1 ---------------------------------------------------------------------------
    @property
    def denoiser_path(self) -> Path:
        return self.dir / "diffusion" / "ema.safetensors"

    @property
    def uses_diffusion(self) -> bool:
        """False for the CNN-only control arm (classifier.diffusion_features: false): no step 1, no layers."""
        return self.cfg.classifier.diffusion_features

    def train_diffusion(self):
        if not self.uses_diffusion:
            print("[step 1] skipped: classifier.diffusion_features is false (the head on the sub-feature CNN alone)")
            return None

        def work():
            d = self.data
            probe = self._step1_probe() if self.cfg.diffusion.epochs == "auto" else None
            images, labels = d.train.images, d.train.labels
            if d.unlabelled is not None:  # step 1 only: the null class (label -1), never step 2 / val / test
                images = cat_images([images, d.unlabelled])
                labels = torch.cat([labels, torch.full((len(d.unlabelled),), -1, dtype=labels.dtype)])
                print(f"[step 1] {len(d.train)} labelled + {len(d.unlabelled)} unlabelled training images")
            return train_diffusion(self.cfg.diffusion, images, labels, len(d.class_names), self.dir / "diffusion",
                                   seed=self.cfg.seed, device=self.device, class_names=d.class_names,
                                   compute=self.cfg.compute, eval_fn=probe, workers=reader_workers())

        return self.run.stage("diffusion", self.denoiser_path, work, label="step 1")

    def _step1_probe(self):
        """diffusion.epochs=auto: the validation probe of an EMA denoiser (every block's pooled features,
        logistic regression fitted on a stratified seeded sample of TRAINING images, scored on the
        VALIDATION split; the test split is never read)."""
        from sklearn.model_selection import train_test_split

        d, dc = self.data, self.cfg.diffusion
        tr, va = d.train, d.val
        rows = torch.arange(len(tr.labels))
        if len(rows) > PROBE_IMAGES:
            rows, _ = train_test_split(rows.numpy(), train_size=PROBE_IMAGES, stratify=tr.labels.numpy(),
                                       random_state=self.cfg.seed)
            rows = torch.as_tensor(rows)
        sched = self._scheduler(dc)

        def probe(model):
            names = model.feature_names
            fc = self.cfg.features
            a = extract(model, tr.images[rows], names, fc, self.cfg.seed, sched, self.device, desc="probe (train)")
            b = extract(model, va.images, names, fc, self.cfg.seed, sched, self.device, desc="probe (val)")
            return validation_probe(a, tr.labels[rows], b, va.labels)

        return probe

    def denoiser(self):
        """(frozen step-1 model, its DiffusionConfig); (None, the run's) for the CNN-only arm."""
        if not self.uses_diffusion:
            return None, self.cfg.diffusion

        if not self.denoiser_path.exists():
            raise FileNotFoundError(f"no step-1 model at {self.denoiser_path}: run 'dcube train-diffusion' first")
        return load_denoiser(self.denoiser_path, self.device)

    # -- step 2a: KS selection and cached features -----------------------------------------
    def select_layers(self):
        fdir = self.dir / "features"
        if not self.uses_diffusion:
            return []
        if (fdir / "selection.json").exists():
            return read_json(fdir / "selection.json")["names"]
        fc = self.cfg.features

        def work():
            model, dcfg = self.denoiser()
            d = self.data
            if fc.layers:
                names = list(fc.layers)
                missing = [n for n in names if n not in model.feature_names]
                if missing:
                    raise ValueError(f"features.layers: {missing} not in {model.feature_names}")
                write_json(fdir / "selection.json", {"names": names, "manual": True})
                return names
            g = torch.Generator().manual_seed(self.cfg.seed)
            k = min(KS_IMAGES, len(d.train.labels))
            idx = torch.randperm(len(d.train.labels), generator=g)[:k]
            maps = extract(model, d.train.images[idx], model.feature_names, fc, self.cfg.seed,
                           self._scheduler(dcfg), self.device, desc="KS sample")
            sel = select_ks_map(maps, max_layers=fc.max_layers, keep=fc.ks_keep)
            if sel.note:
                print(f"[KS] {sel.note}")
            write_json(fdir / "selection.json", sel.to_dict())
            plot_pvalues(sel, fdir / "ks_pvalues.png")
            print("[KS] p-values: " + ", ".join(f"{n}={sel.pvalues[n]:.2g}" for n in sel.order))
            print("[KS] effect (median KS distance above noise): "
                  + ", ".join(f"{n}={sel.statistics[n]:.3f}" for n in sel.order))
            print(f"[KS] selected layers: {sel.names}")
            return sel.names

        return self.timed("select_layers", work)

    def _scheduler(self, dcfg):
        return ddpm_scheduler(dcfg)

    def features(self, split: str, names: list[str], model, dcfg, flipped: bool = False):
        """Cached feature maps of one split (computed once, reused every epoch and on resume)."""

        if not names:  # the CNN-only arm: no diffusion input at all
            return []
        d = self.data
        images = self.split(split).images
        if flipped:
            images = images.flip(-1)
        fc = self.cfg.features
        key = {"model": sha256_file(self.denoiser_path), "features": vars(fc),
               "data": d.info.get("sha256"), "split": split, "flipped": flipped, "n": len(images),
               "synthetic": self.synthetic_key() if split == "train" else None}
        path = self.dir / "features" / f"{split}{'_flipped' if flipped else ''}.safetensors"
        maps = load_features(path, names, key, disk=True)
        if maps is None:  # written batch by batch; read back by rows (float16): the same on resume
            t0 = time.time()
            desc = f"features {split}{' (flipped)' if flipped else ''}"
            if dist.world_size() > 1:  # gathered from the ranks, written by rank 0 (save_features)
                save_features(path, extract(model, images, names, fc, self.cfg.seed, self._scheduler(dcfg),
                                            self.device, workers=reader_workers(), desc=desc,
                                            size=fc.map_size), key)
            else:
                sink = FeatureWriter(path, len(images), key)
                try:
                    extract(model, images, names, fc, self.cfg.seed, self._scheduler(dcfg), self.device,
                            sink=sink, workers=reader_workers(), desc=desc, size=fc.map_size)
                    sink.close()
                except BaseException:
                    sink.abort()
                    raise
            spent = self.info["timings_s"]
            spent["features"] = round(spent.get("features", 0.0) + time.time() - t0, 2)  # inside "classifier"
            maps = load_features(path, names, key, disk=True)
        return [maps[n] for n in names]

    # -- synthetic training images (issue 3) ---------------------------------------------------
    def split(self, name: str):
        """A data split; "train" includes the synthetic set of ``classifier.synthetic_dir`` if set.

        Synthetic images enter only through :func:`dcube.generate.augment_train`, which returns a
        training split and refuses a set generated from another training split; val and test are
        always the real images."""
        if name != "train" or not self.cfg.classifier.synthetic_dir:
            return getattr(self.data, name)
        if self._train is None:
            from dcube.generate import augment_train, load_synthetic

            cc = self.cfg.classifier
            synth = load_synthetic(cc.synthetic_dir)
            self._train = augment_train(self.data, synth, seed=self.cfg.seed)
            n_syn = len(self._train) - len(self.data.train)
            self.info["synthetic"] = {**self.synthetic_key(), "n_added": n_syn}
            self.save_info()
            print(f"[step 2] training on {len(self.data.train)} real + {n_syn} synthetic images ({cc.synthetic_dir})")
        return self._train

    def synthetic_key(self) -> dict | None:
        """What the synthetic part of the training split was made from (for caches and run.json)."""
        cc = self.cfg.classifier
        if not cc.synthetic_dir:
            return None
        return {"dir": str(cc.synthetic_dir), "manifest_sha256": sha256_file(Path(cc.synthetic_dir) / MANIFEST)}

    # -- step 2b ----------------------------------------------------------------------------
    def feature_split(self, split, names, model, dcfg, with_flip=False):
        s = self.split(split)
        flip = self.features(split, names, model, dcfg, flipped=True) if with_flip else None
        return FeatureSplit(self.features(split, names, model, dcfg), s.images, s.labels, flip)

    def train_classifier(self):
        cdir = self.dir / "classifier"
        names = self.select_layers()
        cc = self.cfg.classifier

        def work():
            model, dcfg = self.denoiser()
            train = self.feature_split("train", names, model, dcfg, with_flip=cc.consistency_weight > 0 or cc.flip_augment)
            val = self.feature_split("val", names, model, dcfg)
            fit = train_auto if cc.subfeature == "auto" else train_classifier
            return fit(cc, train, val, self.data.class_names, cdir, self._val_score, denoiser=model,
                                    scheduler=self._scheduler(dcfg), seed=self.cfg.seed, device=self.device,
                                    compute=self.cfg.compute)

        return self.run.stage("classifier", [cdir / "history.json", cdir / BEST], work, done=lambda: None,
                              label="step 2")

    def _val_score(self, y_true, probs):
        m = compute_metrics(y_true, probs, self.data.class_names)
        return select_score(m, SELECT_METRIC), m["accuracy"]

    # -- evaluate ---------------------------------------------------------------------------
    def evaluate(self) -> dict:
        names = self.select_layers()
        model, dcfg = self.denoiser()
        d = self.data
        test = self.feature_split("test", names, model, dcfg)
        val = self.feature_split("val", names, model, dcfg)
        cc = resolve_subfeature(self.cfg.classifier, self.dir / "classifier")  # auto: the CNN validation chose
        head = build_head(cc, test, len(d.class_names)).to(self.device)
        best = load_checkpoint(self.dir / "classifier" / BEST, {"head": head})["best"]
        probs = head_probabilities(head, test, device=self.device)
        val_probs = head_probabilities(head, val, device=self.device).numpy()
        # the record every evaluating command writes (metrics + CIs, per-image probabilities: `dcube compare`)
        rec = evaluation_record(test.labels.numpy(), probs.numpy(), d.test.ids, d.class_names, self.cfg.seed,
                                val.labels.numpy(), val_probs)
        metrics = rec["test"]
        cal = calibrate(val_probs, val.labels.numpy(), probs.numpy(), test.labels.numpy(), d.class_names,
                        self.cfg.classifier.target_sensitivity)
        write_json(self.dir / "classifier" / "calibration.json",
                   {k: cal[k] for k in ("temperature", "fitted_on")} |
                   ({"threshold": cal["operating_point"]["val"]["threshold"], "positive_class": d.class_names[1]}
                    if "operating_point" in cal else {}))
        plot_reliability(probs.numpy(), apply_temperature(probs.numpy(), cal["temperature"]), test.labels.numpy(),
                         self.dir / "reliability.png")
        plot_confusion(metrics, self.dir / "confusion.png")
        plot_roc(test.labels.numpy(), probs.numpy(), d.class_names, self.dir / "roc.png")
        history = read_json(self.dir / "classifier" / "history.json")["history"]
        plot_curves(history, self.dir / "classifier" / "curves.png")
        full = {"test": metrics, "val": rec["val"], "best_epoch": best, "layers": names, "subfeature": cc.subfeature,
                "dataset": self.dataset_name(), "seed": self.cfg.seed, "calibration": cal,
                "timings_s": self.info["timings_s"],
                **{k: rec[k] for k in ("test_probs", "test_labels", "test_ids", "val_probs")}}
        if self.cfg.classifier.subfeature == "auto":  # every candidate's validation score
            full["subfeature_choice"] = read_json(self.dir / "classifier" / CHOICE)
        write_json(self.dir / "metrics.json", full)
        # what predict, report and export may load: the models this evaluation scored
        self.info["model_sha256"] = {f: sha256_file(self.dir / f) for f in MODEL_FILES if (self.dir / f).exists()}
        self.save_info()
        print(format_table(metrics, title=f"test metrics ({self.dir})"))
        print(f"calibration (temperature {cal['temperature']:.3f}, fitted on validation): test ECE "
              f"{cal['test']['ece_before']:.4f} -> {cal['test']['ece_after']:.4f}")
        if (warning := calibration_warning(cal)) is not None:
            print(f"note: {warning}")
        if "operating_point" in cal:
            op = cal["operating_point"]["test"]
            print(f"operating point (threshold {op['threshold']:.4f}, chosen on validation for sensitivity "
                  f">= {self.cfg.classifier.target_sensitivity}): test sensitivity {op['sensitivity']:.3f} "
                  f"{op['sensitivity_ci95']}, specificity {op['specificity']:.3f} {op['specificity_ci95']}")
        return full

    def dataset_name(self) -> str:
        """What the data is called in metrics.json and report.html: the MedMNIST name, else the file or folder."""
        dc = self.cfg.data
        if self.data.info.get("name"):
            return self.data.info["name"]
        return dc.name if dc.source == "medmnist" else Path(dc.path).expanduser().name

def run(cfg: RunConfig, stages=STAGES) -> dict | None:
    """Run the stages (each skipped when its output exists). -> the test metrics (evaluate), else None.
    report.html is an application on top (:func:`dcube.report.write_report`), written by its callers."""
    return DCube(cfg).run.execute(stages).get("evaluate")
