"""Latent diffusion on the COVID-19 Radiography subset (128 px): zero-shot classifier (plain vs
adaptive), timestep x layer analysis, linear probe / MLP head at the recommended (layers, t),
end-to-end fine-tuning, error-map overlays.

    python -m bench.latent_covid --table-only # the page, from the stored JSON

Archived: its autoencoder learning rate and its variants (a zero-shot t range, fine-tuning learning rates)
left the configuration in dcube 1.0 (CHANGELOG.md), so its runs cannot be made again on today's code; the
code that made them is tagged pre-1.0-variants (``git checkout pre-1.0-variants && python -m
bench.latent_covid``). Its JSON results stay, and the page is regenerated from them.

Sized for ~50 min on 2 shared CPU cores (see SETUP): a small AutoencoderKL (8x downsampling,
trained on 64 px crops), a tiny latent UNet trained a few epochs, zero-shot on a stratified
subset of the test split. One JSON per part under bench/results/latent_covid/; the run directory
(checkpoints, error maps) under bench/results/latent_covid/runs/ (git-ignored).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import RESULTS, SMOKE, load_results, machine, run_study, shared_data, shrink
from dcube.diffusion.zeroshot import Adaptive
from dcube.latent.analysis import AnalysisOptions

STUDY = "latent_covid"
COMMAND = "python -m bench.latent_covid"
ZS_IMAGES = 8 if SMOKE else 400  # stratified subset of the test split for the zero-shot classifier
# `dcube analyze`'s options and the adaptive zero-shot's (command options, not config keys)
ANALYSIS = (AnalysisOptions(timesteps=[50, 400], images=24, zs_images=8, zs_trials=1, folds=2) if SMOKE else
            AnalysisOptions(timesteps=[10, 50, 100, 200, 400, 700], images=400, zs_images=100, zs_trials=4))
ADAPTIVE = Adaptive(first_round=2 if SMOKE else 4)
ERROR_MAPS = 1 if SMOKE else 2  # overlays per class


def data_path() -> str:
    root = shared_data()
    return str(root / "covid_radiography_128")


def setup() -> dict:
    cfg = _setup()
    if SMOKE:  # a tiny slice at 32 px: the smoke test of this study
        cfg = shrink(cfg)
        cfg["data"]["image_size"] = 32
    return cfg


def _setup() -> dict:
    return {
        "run_dir": str(RESULTS / STUDY / "runs" / "covid128-s0"), "seed": 0, "threads": 1,
        "data": {"source": "folder", "path": data_path(), "image_size": 128, "val_fraction": 0.1,
                 "test_fraction": 0.2},
        "diffusion": {"backbone": "unet", "preset": "tiny", "epochs": 25, "batch_size": 64, "lr": 5e-4,
                      "checkpoint_every": 25, "sample_steps": 25},
        "latent": {"ae_channels": [16, 32, 32, 32], "ae_latent_channels": 8, "ae_norm_groups": 8,
                   "ae_epochs": 100, "ae_max_steps": 150, "ae_batch_size": 16, "ae_lr": 1e-3, "ae_crop": 64,
                   "ae_checkpoint_every": 25, "zs_trials": 16, "finetune_epochs": 2},
    }


VARIANTS = {  # extra parts: latent-section overrides of the setup
    # the t range where the single-t zero-shot accuracy of the training-split analysis is high
    "8_zeroshot_t100-600": {"zs_t_min": 100, "zs_t_max": 600},
    # 7_finetune overfitted (validation fell): a 10x lower head LR, a 10x higher denoiser LR
    "9_finetune_head_lr1e-4": {"head_lr": 1e-4, "finetune_lr": 1e-4, "finetune_epochs": 4},
}


PARTS = ("1_autoencoder", "2_diffusion", "3_zeroshot_plain", "4_zeroshot_adaptive", "5_analysis", "6_heads",
         "7_finetune", "8_zeroshot_t100-600", "9_finetune_head_lr1e-4", "11_denoiser_class_conditional")
# "10_denoiser_contrastive" (latent.contrastive: true) was removed in dcube 1.0 (CHANGELOG.md): its stored row stays


def _f(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def table() -> str:
    res = {r["key"]: r for r in load_results(STUDY)}
    cfg = setup()
    lines = ["## Latent diffusion on COVID-19 Radiography (128 px): zero-shot classifier, probes, fine-tuning\n",
             f"Command: `{COMMAND}` (resumable; `--table-only` rewrites this section from "
             f"`bench/results/{STUDY}/*.json`). Machine: {machine()}, shared with other jobs: wall-clock "
             "times are indicative. Later parts ran with 1 torch thread (`threads: 1`); the autoencoder part "
             "ran with 2 threads on the oversubscribed CPU, which was much slower per step.\n"]
    if not res:
        return "\n".join(lines + ["No part has finished yet."])
    ae, di = res.get("1_autoencoder"), res.get("2_diffusion")
    lc, dc = cfg["latent"], cfg["diffusion"]
    if ae:
        sizes = ae["split_sizes"]
        lines.append(f"Data: `covid_radiography_128` ({' / '.join(ae['class_names'])}), seeded stratified split "
                     f"train {sizes['train']} / val {sizes['val']} / test {sizes['test']} (8:2 train+val : test; "
                     f"val chooses the head's epoch). Date: {ae['date']}.\n")
        lines.append(f"Autoencoder: MONAI AutoencoderKL, channels {lc['ae_channels']} (8x downsampling), "
                     f"{lc['ae_latent_channels']} latent channels -> 16x16x{lc['ae_latent_channels']} latents "
                     f"(scale {ae['scale']:.3f}), L1 + {lc.get('ae_kl_weight', 1e-6):g} KL, lr {lc.get('ae_lr', 5e-4):g}, {ae['steps']} steps of {lc['ae_batch_size']} random "
                     f"{lc['ae_crop']} px crops ({ae['train_seconds'] / 60:.1f} min). Validation reconstruction: "
                     f"**PSNR {ae['recon_val']['psnr']:.2f} dB, SSIM {ae['recon_val']['ssim']:.3f}** "
                     f"({ae['recon_val']['n']} images).\n")
    if di:
        lines.append(f"Latent diffusion: {dc['backbone']} `{dc['preset']}`, {di['steps']} steps of batch "
                     f"{dc['batch_size']} (lr {dc['lr']}, {dc['epochs']} epochs; {di['train_seconds'] / 60:.1f} min), "
                     f"final noise MSE {di['final_mse']:.3f}. Shortened for the CPU budget.\n")
    lines += ["| method | features / cost | test images | ACC | balanced ACC | AUC | macro-F1 | images/s |",
              "|---|---|---|---|---|---|---|---|"]
    for key, name in (("3_zeroshot_plain", "zero-shot (plain)"), ("4_zeroshot_adaptive", "zero-shot (adaptive)"),
                      ("8_zeroshot_t100-600", "zero-shot (plain), t range from the analysis")):
        r = res.get(key)
        if r:
            m, o = r["metrics"], {**lc, **r.get("overrides", {})}
            how = (f"K={r['trials']} (t, noise) pairs, t evenly spaced in [{o.get('zs_t_min', 50)}, "
                   f"{o.get('zs_t_max', 950)}], {r['weighting']} weights; "
                   + (f"first round {r['first_round']}; " if r["adaptive"] else "")
                   + f"{r['evaluations_per_image']:.1f} denoiser inputs/image")
            lines.append(f"| {name} | {how} | {r['n_images']} (stratified subset) | {_f(m['accuracy'])} | "
                         f"{_f(m['balanced_accuracy'])} | {_f(m['auc'])} | {_f(m['f1_macro'])} | "
                         f"{r['images_per_s']:.2f} |")
    h = res.get("6_heads")
    if any(k in res for k in ("3_zeroshot_plain", "4_zeroshot_adaptive")):
        lines.append("| *(images/s: the classifier on precomputed latents, one torch thread, on a CPU shared with "
                     "other jobs; plain and adaptive ran back to back)* | | | | | | | |")
    if h:
        rec = h["recommended"]
        where = f"{'+'.join(rec['layers'])} @ t={rec['timestep']} (pooled, {h['feature_dim']} dims)"
        for key, name in (("linear_probe", "linear probe (logistic regression)"), ("mlp_head", "MLP head")):
            m = h[key]
            lines.append(f"| {name} | {where} | {m['n']} (all) | {_f(m['accuracy'])} | {_f(m['balanced_accuracy'])} "
                         f"| {_f(m['auc'])} | {_f(m['f1_macro'])} | - |")
    for key in ("7_finetune", "9_finetune_head_lr1e-4"):
        f = res.get(key)
        if not f:
            continue
        m = f["test"]
        lines.append(f"| fine-tuned end to end | denoiser lr {f['finetune_lr']:g}, head lr {f['head_lr']:g}, "
                     f"{f['epochs']} epoch(s), best epoch {f['best_epoch']} on val"
                     + (" (no epoch beat the MLP head it starts from: these are its weights)" if f["best_epoch"] == 0
                        else "") + f" | {m['n']} (all) | "
                     f"{_f(m['accuracy'])} | {_f(m['balanced_accuracy'])} | {_f(m['auc'])} | {_f(m['f1_macro'])} | - |")
    a = res.get("5_analysis")
    if a:
        ts = a["timesteps"]
        opts = a.get("options") or vars(ANALYSIS)  # older results: the same options, then config keys
        lines += ["", f"Timestep x layer analysis (`dcube analyze`): linear probe, {a['n_probe_images']} training images, "
                  f"{opts['folds']}-fold CV balanced accuracy; zero-shot "
                  f"accuracy with a single t ({opts['zs_trials']} noises, {a['n_zero_shot_images']} training "
                  f"images). Recommended: **t = {a['recommended']['timestep']}, layers "
                  f"{a['recommended']['layers']}** (`{' '.join('--set ' + o for o in a['feature_overrides'])}`). "
                  f"Heat map: `bench/results/{STUDY}/analysis.png`.\n",
                  "| layer | " + " | ".join(f"t={t}" for t in ts) + " |", "|---" * (len(ts) + 1) + "|"]
        for n in a["layers"]:
            lines.append(f"| {n} | " + " | ".join(_f(a["probe_balanced_accuracy"][n][str(t)]) for t in ts) + " |")
        lines.append("| *zero-shot acc* | " + " | ".join(_f(a["zero_shot_accuracy"][str(t)]) for t in ts) + " |")
    lines += _before_after(res)
    z = res.get("3_zeroshot_plain")
    if z and z.get("error_maps"):
        lines += ["", "Error-map overlays (how to read them: `docs/latent.md`), in the run directory: "
                  + ", ".join(f"`{_repo_path(e['path'])}` (true {e['true']}, "
                              f"predicted {e['pred']})" for e in z["error_maps"]) + "."]
    missing = [k for k in PARTS if k not in res]
    if missing:
        lines += ["", f"Not finished yet: {', '.join(missing)}."]
    return "\n".join(lines)


def _repo_path(path: str) -> str:
    """`path` relative to the repository when it lies under ``bench/results`` (wherever the run was made)."""
    parts = Path(path).parts
    for i in range(len(parts) - 1):
        if parts[i:i + 2] == ("bench", "results"):
            return str(Path(*parts[i:]))
    return path


def _before_after(res: dict) -> list[str]:
    import numpy as np

    from dcube.evaluate.stats import paired_bootstrap

    b, a = res.get("10_denoiser_contrastive"), res.get("11_denoiser_class_conditional")
    if not (a or b):
        return []
    out = ["", "Zero-shot before / after the latent denoiser's training change (issue 11): the same autoencoder, "
           "the same steps and seed, the plain zero-shot classifier on the same stratified test subset; one "
           "denoiser seed, so the paired column covers the test images, not training seeds.\n",
           "| latent denoiser training | steps | final noise MSE | test images | ACC | balanced ACC | AUC | "
           "macro-F1 | minus the contrastive row: ΔAUC [95 % CI], p |", "|---|---|---|---|---|---|---|---|---|"]
    for r, name in ((b, "contrastive pairs under the uniform condition (dcube 0.1)"),
                    (a, "purely class-conditional, label dropout only (today's default)")):
        if not r:
            continue
        m, vs = r["metrics"], "-"
        if r is a and b and a["ids"] == b["ids"]:
            pb = paired_bootstrap(np.array(a["labels"]), [np.array(a["probs"])], [np.array(b["probs"])], "auc")
            vs = (f"{pb['diff']:+.3f} [{pb['ci'][0]:+.3f}, {pb['ci'][1]:+.3f}], p = {pb['p']:.3f}, Holm p = "
                  f"{pb['p']:.3f} (a family of one)")
        out.append(f"| {name} | {r['steps']} | {r['final_mse']:.3f} | {r['n_images']} | {_f(m['accuracy'])} | "
                   f"{_f(m['balanced_accuracy'])} | {_f(m['auc'])} | {_f(m['f1_macro'])} | {vs} |")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table-only", action="store_true", help="regenerate the page (the only thing an archived study does)")
    a = p.parse_args(argv)
    if not a.table_only:
        print("bench.latent_covid is archived (its settings left the configuration in dcube 1.0); --table-only "
              "regenerates its page", file=sys.stderr)
        return 2
    return run_study(STUDY, iter(()), table, table_only=True)


if __name__ == "__main__":
    sys.exit(main())
