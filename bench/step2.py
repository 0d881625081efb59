"""Step 2, part by part (issue 12): which layer selection, which cycle loss, which head - on validation.

    python -m bench.step2 --table-only      # the page, from the stored JSON

Archived: the variants it compared that validation did not choose were removed in dcube 1.0 (CHANGELOG.md),
so its runs cannot be made again on today's code; the code that made them is tagged pre-1.0-variants
(``git checkout pre-1.0-variants && python -m bench.step2``). Its JSON results stay, and the page is
regenerated from them.

BreastMNIST (28 px, official split), the accuracy study's shortened schedules. Every variant of a seed
shares that seed's step-1 model (``bench.ablations``' contrastive one, trained once). Rows: mean ± std
over seeds of validation AUC (what a default may be chosen on) and test ACC/AUC, the 95 % CI of the
seed-mean test AUC, and the paired difference to the frozen EfficientNet-Lite0 linear probe on the same
test images (both: bench.common.STATS).
A second table: the layers each selection rule keeps on 5 different KS samples of each step-1 model.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench.common import (LONG_STEPS, RESULTS, STATS, ci_cell, load_results, machine, mean_std, paired_cell, paired_test,
                          run_study, split_labels)

STUDY = "step2"
DATASET = "breastmnist"
# the head and losses as published, the paper's Eq. 6 selection, the posterior cycle loss
NEW = {"features": {"select": "ks_map"},
       "classifier": {"score_norm": "none", "fuse_size": 16, "flip_augment": True, "cycle_form": "posterior",
                      "cycle_weight": 1.0}}
V01 = {"features": {"select": "ks"},
       "classifier": {"score_norm": "softmax", "fuse_size": 8, "flip_augment": False, "cycle_form": "soft",
                      "cycle_weight": 0.1}}


LEAN = {"cycle_batch": 8, "consistency_batch": 16, "bn_recalibration": 256}


def _with(**sections) -> dict:
    return {s: {**NEW.get(s, {}), **sections.get(s, {})} for s in ("features", "classifier", "compute")}


VARIANTS = {  # key -> (label, features + classifier + compute overrides)
    "v01": ("dcube 0.1 defaults: pooled KS, softmax scores, fuse 8, no flips, soft cycle x0.1", V01),
    "new": ("published head (raw scores, fuse 16, flips) + Eq. 6 KS + posterior cycle x1", NEW),
    "sel_ks": ("new, layers by the pooled KS rule (dcube 0.1)", _with(features={"select": "ks"})),
    "sel_probe": ("new, layers by a linear probe (training split)", _with(features={"select": "probe"})),
    "sel_all": ("new, all layers", _with(features={"select": "all", "max_layers": None})),
    "cyc_off": ("new, no cycle loss", _with(classifier={"cycle_weight": 0.0})),
    "cyc_soft10": ("new, the soft cycle loss x10 (the paper's weight)",
                   _with(classifier={"cycle_form": "soft", "cycle_weight": 10.0})),
    "multi_t": ("new, the chosen layers at t = 10, 50, 200, mixed by learned weights",
                _with(features={"timesteps": [10, 50, 200]})),
    "bn_off": ("new, no batch-norm recalibration before validation", _with(classifier={"bn_recalibration": 0})),
    "head_v01": ("new, the dcube 0.1 head (softmax scores, fuse 8, no flips)",
                 _with(classifier={"score_norm": "softmax", "fuse_size": 8, "flip_augment": False})),
    # 15 epochs of 546 images in batches of 64 are 135 steps, and most runs chose their last epoch
    "steps_long": (f"new, the soft cycle loss x10, step 2 >= {LONG_STEPS} optimiser steps (classifier.min_steps)",
                   _with(classifier={"cycle_form": "soft", "cycle_weight": 10.0, "min_steps": LONG_STEPS})),
    # issue 12 item 6 (step 2 at the speed of step 1): the sub-feature CNN's first blocks frozen, their
    # outputs cached once per split (classifier.cnn_frozen_blocks; 11 = the whole tapped trunk frozen)
    "cnn_frozen6": ("new, the soft cycle loss x10, EfficientNet stem + blocks 0-5 frozen and cached",
                    _with(classifier={"cycle_form": "soft", "cycle_weight": 10.0, "cnn_frozen_blocks": 6})),
    "cnn_frozen11": ("new, the soft cycle loss x10, EfficientNet frozen (all 11 blocks cached)",
                     _with(classifier={"cycle_form": "soft", "cycle_weight": 10.0, "cnn_frozen_blocks": 11})),
    # the reference (today's default) trained again on today's code: how far the stored reference has drifted
    "ref_now": ("new, the soft cycle loss x10 (the paper's weight), trained again on today's code",
                _with(classifier={"cycle_form": "soft", "cycle_weight": 10.0})),
    # issue 12 item 6, the other levers (bench.speed): fewer images per step through the frozen denoiser and
    # the flipped view, fewer BN-recalibration images, a smaller EfficientNet working size (64 -> 32 px)
    "lean": ("new, the soft cycle loss x10, 8 cycle + 16 flip-consistency images per step, BN recalibration "
             "on 256", _with(classifier={**LEAN, "cycle_form": "soft", "cycle_weight": 10.0})),
    "cnn_in32": ("new, the soft cycle loss x10, EfficientNet at 32 px (28 px images upsampled to 32, not 64)",
                 _with(classifier={"cycle_form": "soft", "cycle_weight": 10.0, "cnn_input_size": 32})),
    "fast": ("new, the soft cycle loss x10, both: EfficientNet at 32 px and the lean batches",
             _with(classifier={**LEAN, "cycle_form": "soft", "cycle_weight": 10.0, "cnn_input_size": 32})),
    # one sitting, one code version and one CPU (step-1 models trained again too): the cycle loss decision
    # again, since the reference trained again (ref_now) fell to the no-cycle row; and channels-last memory
    # format for step 2 (same arithmetic, other kernels; a first timing on an AMD EPYC: 39 -> 26 s per epoch)
    "now_off": ("again in one sitting: no cycle loss", _with(classifier={"cycle_weight": 0.0})),
    "now_soft10": ("again in one sitting: the soft cycle loss x10 (the default until 2026-12-03)",
                   _with(classifier={"cycle_form": "soft", "cycle_weight": 10.0})),
    "now_cl": ("again in one sitting: the soft cycle loss x10, step 2 in channels-last memory format "
               "(`compute.channels_last`; the default since 2026-12-03, without the cycle loss)",
               _with(classifier={"cycle_form": "soft", "cycle_weight": 10.0}, compute={"channels_last": True})),
    # a later sitting (step-1 models trained again): the sub-feature CNN. The paper's is an ImageNet CNN;
    # MONAI's ResNet-18 with the 28-px stem, randomly initialised and fine-tuned at classifier.cnn_lr, is the
    # strongest plain model on BreastMNIST here (bench.accuracy: validation AUC 0.931 against D-Cube's 0.88)
    "sub_eff": ("sub-feature sitting: today's defaults (EfficientNet-Lite0 ImageNet sub-features, no cycle loss, "
                "channels-last step 2)", _with(classifier={"cycle_weight": 0.0})),
    "sub_res18": ("sub-feature sitting: ResNet-18 sub-features (MONAI, 28-px stem, random initialisation)",
                  _with(classifier={"cycle_weight": 0.0, "subfeature": "resnet18"})),
}


def _val_labels(rec: dict):
    return split_labels(rec["data_config"], rec["seed"], "val")


def _val_paired(rs: list[dict], ref: list[dict]) -> str:
    """Seed-mean validation AUC difference to `ref` on the same validation images (paired bootstrap)."""
    from dcube.evaluate.stats import paired_bootstrap

    if not rs or not ref or any("val_probs" not in r for r in rs + ref):
        return "-"
    seeds = sorted({r["seed"] for r in rs} & {r["seed"] for r in ref})
    a = [np.array(r["val_probs"]) for r in rs if r["seed"] in seeds]
    b = [np.array(r["val_probs"]) for r in ref if r["seed"] in seeds]
    if not a:
        return "-"
    pb = paired_bootstrap(_val_labels(rs[0]), a, b, "auc")
    return f"{pb['diff']:+.3f} [{pb['ci'][0]:+.3f}, {pb['ci'][1]:+.3f}], p = {pb['p']:.2f}"


# per step-2 part: the reference option first (the paper's form, or "off" for a loss term that must earn
# its place); another option replaces it only with a higher seed-mean validation AUC at paired p < 0.05
FACTORS = {
    "layer selection": ["new", "sel_ks", "sel_probe", "sel_all"],
    "cycle loss": ["cyc_off", "new", "cyc_soft10"],
    "head": ["new", "head_v01"],
    "several timesteps": ["new", "multi_t"],
    "BN recalibration": ["new", "bn_off"],
    "step-2 length": ["cyc_soft10", "steps_long"],
    "sub-feature CNN frozen (speed)": ["cyc_soft10", "cnn_frozen6", "cnn_frozen11"],
    "the reference, trained again": ["cyc_soft10", "ref_now"],
    "step-2 batches and CNN size (speed)": ["cyc_soft10", "lean", "cnn_in32", "fast"],
    "cycle loss, again in one sitting": ["now_off", "now_soft10"],
    "memory format, again in one sitting (speed)": ["now_soft10", "now_cl"],
    "sub-feature CNN, a later sitting": ["sub_eff", "sub_res18"],
}
# parts that only make step 2 cheaper: an option replaces the reference when it loses no validation AUC, i.e.
# its paired seed-mean validation ΔAUC is >= -SPEED_MARGIN (fixed before any of these runs); the last such
# option (the parts list them slowest first) is chosen
SPEED_FACTORS = {"sub-feature CNN frozen (speed)", "step-2 batches and CNN size (speed)",
                 "memory format, again in one sitting (speed)"}
SPEED_MARGIN = 0.01
# parts run in one sitting with their own reference: not compared with `ref_now` (other step-1 models)
SITTING_FACTORS = {"cycle loss, again in one sitting", "memory format, again in one sitting (speed)",
                   "sub-feature CNN, a later sitting"}


def _decisions(rows: list[dict]) -> list[str]:
    from dcube.evaluate.stats import holm, paired_bootstrap

    out = ["", "Defaults chosen on validation (rule: the first option of each part is the reference, the paper's "
           "form or, for a loss term, off; another option replaces it only with a higher seed-mean validation AUC "
           "at paired-bootstrap p < 0.05 on the 78 validation images, same seeds; a part marked (speed) only makes "
           f"step 2 cheaper, and its fastest option with a paired validation ΔAUC >= -{SPEED_MARGIN} replaces the "
           "reference). The rule of its day read the raw p; each part's comparisons are one family, and its "
           "Holm-adjusted p stands beside the raw one:\n",
           "| part | option | seeds | val AUC | val ACC | minus the reference: val ΔAUC [95 % CI], p | chosen |",
           "|---|---|---|---|---|---|---|"]
    for part, keys in FACTORS.items():
        by = {k: sorted([r for r in rows if r["variant"] == k and "val_probs" in r], key=lambda r: r["seed"])
              for k in keys}
        ref, chosen = by[keys[0]], keys[0]
        best = None
        cells, tests = {}, {}
        for k in keys[1:]:
            seeds = sorted({r["seed"] for r in by[k]} & {r["seed"] for r in ref})
            if seeds:
                tests[k] = paired_bootstrap(_val_labels(ref[0]),
                                            [np.array(r["val_probs"]) for r in by[k] if r["seed"] in seeds],
                                            [np.array(r["val_probs"]) for r in ref if r["seed"] in seeds], "auc")
        # the part's comparisons are its family: Holm beside the raw p (the choice of its day used the raw p)
        for (k, pb), q in zip(tests.items(), holm([t["p"] for t in tests.values()])):
            cells[k] = f"{pb['diff']:+.3f} [{pb['ci'][0]:+.3f}, {pb['ci'][1]:+.3f}], p = {pb['p']:.2f}, Holm p = {q:.2f}"
            if part in SPEED_FACTORS:
                if pb["diff"] >= -SPEED_MARGIN:
                    chosen = k
            elif pb["diff"] > 0 and pb["p"] < 0.05 and (best is None or pb["diff"] > best):
                best, chosen = pb["diff"], k
        for k in keys:
            rs = by[k]
            if not rs:
                continue
            out.append(f"| {part} | {VARIANTS[k][0]} | {len(rs)} | {mean_std([r['val']['auc'] for r in rs])} | "
                       f"{mean_std([r['val']['accuracy'] for r in rs])} | {cells.get(k, 'reference')} | "
                       f"{'**yes**' if k == chosen else ''} |")
    # the stored reference was trained on older code: the speed options against the one trained again today
    now = sorted([r for r in rows if r["variant"] == "ref_now" and "val_probs" in r], key=lambda r: r["seed"])
    cells = []
    for k in (k for part in FACTORS if part in SPEED_FACTORS - SITTING_FACTORS for k in FACTORS[part][1:]):
        rs = {r["seed"]: r for r in rows if r["variant"] == k and "val_probs" in r}
        same = [r for r in now if r["seed"] in rs]
        if same:
            pb = paired_bootstrap(_val_labels(same[0]), [np.array(rs[r["seed"]]["val_probs"]) for r in same],
                                  [np.array(r["val_probs"]) for r in same], "auc")
            cells.append(f"{k} {pb['diff']:+.3f} [{pb['ci'][0]:+.3f}, {pb['ci'][1]:+.3f}], p = {pb['p']:.2f}")
    if cells:
        out += ["", f"The (speed) options against the reference trained again on today's code (`ref_now`, "
                f"{len(now)} seeds; val ΔAUC [95 % CI], p; each must be >= -{SPEED_MARGIN} to replace it): "
                + "; ".join(cells) + "."]
    return out


def _probe_runs(method: str = "linear-probe"):
    rows = [r for r in load_results("accuracy") if r["dataset"] == DATASET and r.get("method_id") == method
            if "test_probs" in r] if (RESULTS / "accuracy").exists() else []
    return sorted(rows, key=lambda r: r["seed"])


def _short(rs: list[dict], ref: list[dict]) -> str:
    """'ΔAUC, p; ΔACC, p' of the seed-mean against `ref` on the same test images (paired bootstrap)."""
    tests = [paired_test(rs, ref, m) for m in ("auc", "accuracy")]
    if None in tests:
        return "-"
    return "; ".join(f"{t['diff']:+.3f}, p = {t['p']:.3f}" for t in tests)


def table() -> str:
    rows = [r for r in load_results(STUDY) if r.get("kind") != "stability"]
    lines = ["## Step 2, part by part (BreastMNIST, 28 px)\n",
             f"Command: `python -m bench.step2` (resumable). Machine: {machine()}. Step-1 model per seed shared by "
             "every variant (30 epochs, contrastive); step 2: 15 epochs, best epoch on validation AUC. "
             "Mean ± std over seeds; *test AUC 95 % CI* of the seed mean and *vs probe*, the seed-mean test-AUC "
             "difference to the frozen EfficientNet-Lite0 linear probe on the same 156 test images, with its "
             f"verdict: {STATS}; *vs ResNet-18*: the "
             "same against `bench.accuracy`'s ResNet-18 (3 seeds, 30 epochs), AUC and accuracy; *cycle grad / CE "
             "grad*: median over epochs of the ratio of the weighted cycle term's gradient norm to the weighted "
             "cross-entropy's on the head's parameters (first batch of epochs 1, 2, 4, 8, ... and the last; of every epoch before 2026-12-02); *step-2 s*: wall seconds of "
             "step 2 with its feature extraction and posterior (one thread; other jobs shared the 2 cores for some runs, so it is a rough cost). Defaults "
             "are chosen on the validation column only.\n",
             "| variant | seeds | val AUC | val AUC minus `new`'s (paired, same seeds) | test ACC | test AUC | "
             "test AUC 95 % CI | vs probe: ΔAUC [95 % CI], p | vs ResNet-18: ΔAUC, p; ΔACC, p | cycle grad / CE grad | "
             "step-2 s | layers (seed 0) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    probe, resnet = _probe_runs(), _probe_runs("resnet18")
    for key, (label, _) in VARIANTS.items():
        rs = sorted([r for r in rows if r["variant"] == key], key=lambda r: r["seed"])
        if not rs:
            continue
        ratios = [v for r in rs for v in r.get("cycle_grad_ratio") or [] if v is not None]
        ratio = f"{np.median(ratios):.2g}" if ratios else "-"
        ref = [r for r in rows if r["variant"] == "new"]
        vs_new = "-" if key == "new" else _val_paired(rs, ref)
        lines.append(f"| {label} | {len(rs)} | {mean_std([r['val']['auc'] for r in rs])} | {vs_new} | "
                     f"{mean_std([r['test']['accuracy'] for r in rs])} | {mean_std([r['test']['auc'] for r in rs])} | "
                     f"{ci_cell(rs)} | {paired_cell(rs, probe[:1])} | {_short(rs, resnet)} | {ratio} | "
                     f"{np.mean([r['stage_seconds'].get('classifier', np.nan) for r in rs]):.0f} | {', '.join(rs[0]['layers'])} |")
    for ref, name in ((probe, "frozen EfficientNet-Lite0 linear probe"), (resnet, "ResNet-18, 30 epochs")):
        if ref:
            lines.append(f"| {name} (`bench.accuracy`) | {len(ref)} | {mean_std([r['val']['auc'] for r in ref])} | - | "
                         f"{mean_std([r['test']['accuracy'] for r in ref])} | "
                         f"{mean_std([r['test']['auc'] for r in ref])} | {ci_cell(ref)} | - | - | - | - | - |")
    lines += _decisions(rows)
    stab = sorted([r for r in load_results(STUDY) if r.get("kind") == "stability"], key=lambda r: r["seed"])
    if stab:
        lines += ["", "Layers kept when only the KS sample (256 training images) changes, 5 samples per step-1 model "
                  "(distinct sets / samples):\n", "| step-1 seed | pooled KS (dcube 0.1) | Eq. 6 KS (`ks_map`) | "
                  "Eq. 6 effect size, min-max over samples |", "|---|---|---|---|"]
        for r in stab:
            def sets(v):
                u = list(dict.fromkeys(tuple(x) for x in v))
                return f"{len(u)}/{len(v)}: " + "; ".join("{" + ", ".join(x) + "}" for x in u)
            eff = {n: [e[n] for e in r["effects"]] for n in r["effects"][0]}
            e = ", ".join(f"{n} {min(v):.3f}-{max(v):.3f}" for n, v in eff.items())
            lines.append(f"| {r['seed']} | {sets(r['ks'])} | {sets(r['ks_map'])} | {e} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table-only", action="store_true", help="regenerate the page (the only thing an archived study does)")
    a = p.parse_args(argv)
    if not a.table_only:
        print("bench.step2 is archived (its variants were removed in dcube 1.0); --table-only regenerates its page",
              file=sys.stderr)
        return 2
    return run_study(STUDY, iter(()), table, table_only=True)


if __name__ == "__main__":
    sys.exit(main())
