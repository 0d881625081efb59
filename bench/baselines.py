"""The baselines every study compares D-Cube with, trained by dcube's own loops on the same split
and scored by the same metrics: ResNet-18/50 from scratch (MedMNIST v2 protocol: Adam, batch 128,
LR x0.1 at 50% and 75% of the epochs, best epoch on validation AUC; fewer epochs where the CPU
budget demands, always labelled), EfficientNet-Lite0 ImageNet-pretrained fine-tuned, and a
linear probe on frozen EfficientNet-Lite0 features (C chosen on validation)."""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import SMOKE

NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "efficientnet-lite0": "EfficientNet-Lite0 (ImageNet, fine-tuned)",
         "linear-probe": "linear probe (frozen EfficientNet-Lite0)",
         "fixmatch": "FixMatch (ResNet-18; mu 7, tau 0.95, lambda_u 1; Adam as the ResNet-18 rows)"}
DEFAULT_LR = {"resnet18": 1e-3, "resnet50": 1e-3, "efficientnet-lite0": 1e-4, "fixmatch": 1e-3}


def _score(class_names):
    from dcube.evaluate import compute_metrics, select_score

    return lambda y, p: select_score(compute_metrics(y, p, class_names), "auc")


def run_baseline(method: str, data, run_dir: Path, seed: int, epochs: int | None = None,
                 threads: int = 1, device: str = "cpu", min_steps: int = 0) -> dict:
    """Train/select/test one baseline on a loaded DataBundle -> JSON-able result."""
    import torch

    from dcube.evaluate import compute_metrics
    from dcube.utils.runtime import configure_torch, seed_everything

    configure_torch(threads)
    seed_everything(seed)
    t0 = time.time()
    score = _score(data.class_names)
    if method == "linear-probe":
        from dcube.classify.probe import fit_linear_probe, frozen_embeddings

        emb = {s: frozen_embeddings(getattr(data, s).images) for s in ("train", "val", "test")}
        lab = {s: getattr(data, s).labels.numpy() for s in ("train", "val", "test")}
        fit = fit_linear_probe(emb["train"], lab["train"], emb["val"], lab["val"], score, seed=seed)
        val_p, test_p = (torch.from_numpy(fit["model"].predict_proba(emb[s])) for s in ("val", "test"))
        extra = {"C": fit["C"], "val_scores_by_C": {str(k): v for k, v in fit["scores"].items()}}
        schedule = {"C_grid": list(fit["scores"])}
        seconds = time.time() - t0
    else:
        from dcube.classify.baseline import BaselineConfig, train_baseline

        cfg = BaselineConfig(model="resnet18" if method == "fixmatch" else method, epochs=epochs, batch_size=128,
                             lr=DEFAULT_LR[method], lr_milestones=(0.5, 0.75), min_steps=min_steps,
                             fixmatch=method == "fixmatch", unlabelled_ratio=1 if SMOKE else 7)
        res = train_baseline(cfg, data, run_dir, score, seed=seed, device=device)
        val_p, test_p = res["val_probs"], res["test_probs"]
        extra = {"best_epoch": res["best_epoch"], "history": res["history"]}
        seconds = res["train_seconds"]  # every session's epochs, a resumed run's included
        schedule = {"epochs": epochs, "passes_per_epoch": cfg.passes_for(len(data.train)), "batch_size": 128, "lr": cfg.lr,
                    "lr_milestones": [0.5, 0.75], **({"min_steps": min_steps} if min_steps else {})}
    return {"method": NAMES[method], "method_id": method, "seed": seed, "schedule": schedule,
            "test": compute_metrics(data.test.labels, test_p, data.class_names),
            "test_probs": [[round(float(v), 6) for v in row] for row in torch.as_tensor(test_p).tolist()],
            "val": compute_metrics(data.val.labels, val_p, data.class_names),
            "train_seconds": round(seconds, 1), "threads": threads, **extra}
