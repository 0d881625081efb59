"""Where do the heat maps point? Lung and border enrichment of each attribution method (issue 13).

    python -m bench.heatmaps [--run-dir runs/demo] [--images 40] [--table-only]

On `images` seeded VALIDATION images of a finished chest X-ray run (default: the demo's), each
method's map for the predicted class is clamped at 0 and normalised to sum 1. Its *lung enrichment* is
the share of the map inside a lung proxy divided by the proxy's share of the image (1 = no preference,
> 1 = on the lungs); *border enrichment* is the same for the outer ring (1/9 of the side). The lung
proxy: interior pixels darker than the interior's median (the lung fields are air; bone, heart and
soft tissue are brighter) -- no lung masks ship with PneumoniaMNIST, so this is a proxy, drawn in the
panel next to the maps for the reader to judge. Pneumonia makes parts of the lungs brighter (opacities),
which that per-image proxy leaves out; the *lung field* is therefore a second, fixed region: the same
rule on the mean TRAINING image (where the lungs are on average, opacified or not). Its enrichment is
also given on the images predicted as the second class (pneumonia), where the evidence should be. The
*centre* is the band between the two lung fields (mediastinum, heart, spine). A *deletion* table says,
without any attribution method, what the model rests on: the drop of the predicted class's probability
when the lung field, the centre or the border ring is replaced by the image's mean. Methods: MONAI GradCAM on head stages, HiResCAM
(gradient x activation, faithful for a flatten + FC head; hand-written: MONAI has none), MONAI
OcclusionSensitivity on the calibrated-probability model, and the diffusion evidence map of
`dcube predict --heatmaps`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import RESULTS, THREADS, machine, run_study
from dcube.latent.errormaps import NOISES as ERRORMAP_NOISES

STUDY = "heatmaps"


def _ring(size: int):
    import torch

    ring = torch.zeros(size, size, dtype=torch.bool)
    b = max(1, size // 9)
    ring[:b] = ring[-b:] = True
    ring[:, :b] = ring[:, -b:] = True
    return ring


def lung_proxy(x, ring):
    inner = ~ring
    return inner & (x[0] < x[0][inner].median())


def centre_band(field):
    """The region between the two lung fields (mediastinum, heart, spine): on each row that has lung-field
    pixels, the columns from the field's first to its last pixel that are not lung field."""
    import torch

    centre = torch.zeros_like(field)
    for r in range(field.shape[0]):
        cols = field[r].nonzero().flatten()
        if len(cols):
            centre[r, int(cols.min()):int(cols.max()) + 1] = True
    return centre & ~field


def deletion(pred, X, before, c, region) -> list[float]:
    """The drop of each image's predicted-class probability (calibrated; `before`: pred(X)'s) when `region`
    is replaced by the image's mean: what the model rests on, measured without any attribution method."""
    import torch

    after = pred(torch.where(region, X.mean((1, 2, 3), keepdim=True), X))[1]
    return [float(before[i, k] - after[i, k]) for i, k in enumerate(c)]


def enrichment(m, mask) -> float:
    m = m.float().clamp(min=0)
    return float((m[mask].sum() / (m.sum() + 1e-12)) / mask.float().mean())


NOISE_VARIANTS = (2, 8)


def _evidence(pred, x, probs, noises: int):
    """Predictor.diffusion_map with `noises` noise draws per timestep instead of the run's."""
    import numpy as np

    from dcube.latent.autoencoder import LatentCodec
    from dcube.latent.errormaps import TIMESTEPS, error_map

    order = np.argsort(-probs)
    return error_map(pred.model, pred.scheduler, LatentCodec(None), x, (int(order[0]), int(order[1])),
                     list(TIMESTEPS), noises, pred.cfg.seed, pred.device)


def measure(run_dir: str, n: int) -> dict:
    import numpy as np
    import torch
    from monai.visualize import GradCAM, OcclusionSensitivity

    from dcube.data import load_data
    from dcube.predict import Predictor

    torch.set_num_threads(THREADS)
    pred = Predictor(run_dir)
    data = load_data(pred.cfg.data, pred.cfg.seed)
    val = data.val
    idx = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[:n]
    X = val.images[idx]
    raw, calibrated = pred(X)
    S = X.shape[-1]
    ring = _ring(S)
    field = lung_proxy(data.train.images.mean(0), ring)  # where the lungs are on average (training split)
    centre = centre_band(field)

    class Net(torch.nn.Module):  # the head with the frozen features inside (as Predictor.gradcam)
        def __init__(self):
            super().__init__()
            self.head = pred.head

        def forward(self, x):
            with torch.no_grad():
                feats = pred._features(x.detach().cpu())
            return self.head(feats, x)

    net = Net().eval()
    up = lambda m: torch.nn.functional.interpolate(m.float(), size=(S, S), mode="bilinear")[0, 0].detach()

    def gradcam(layer):
        return lambda x, c: up(GradCAM(net, target_layers=layer)(x[None], class_idx=c))

    def hirescam(layer):
        def f(x, c):
            acts = {}
            h = dict(net.named_modules())[layer].register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
            out = net(x[None].clone().requires_grad_(True))
            acts["a"].retain_grad()
            out[0, c].backward()
            h.remove()
            a = acts["a"]
            return up((a.grad * a).sum(1, keepdim=True).relu())
        return f

    class Prob(torch.nn.Module):
        def forward(self, x):
            return torch.from_numpy(pred(x)[1]).float()

    occ = OcclusionSensitivity(Prob(), mask_size=max(3, S // 6), overlap=0.6, n_batch=64, mode="mean_img",
                               verbose=False)

    def occlusion(x, c):
        m, _ = occ(x[None])
        return (torch.from_numpy(pred(x[None])[1]).float()[0, c] - m[0, c]).relu()

    methods = {"Grad-CAM head.stages.2 (predict's)": gradcam("head.stages.2"),
               "Grad-CAM head.stages.0": gradcam("head.stages.0"),
               "Grad-CAM head.proj (the diffusion features)": gradcam("head.proj"),
               "HiResCAM head.stages.2": hirescam("head.stages.2"),
               "HiResCAM head.to_one": hirescam("head.to_one"),
               "occlusion (MONAI)": occlusion,
               "diffusion evidence map": lambda x, c: pred.diffusion_map(x, raw_i)}
    for i, name in enumerate(pred.layers):  # each diffusion layer's map at its own resolution, before fusion
        methods[f"Grad-CAM head.norms.{i} (diffusion layer {name})"] = gradcam(f"head.norms.{i}")
    for noises in NOISE_VARIANTS:  # the same map averaged over more noise draws than the default
        if noises != ERRORMAP_NOISES:
            methods[f"diffusion evidence map, {noises} noise draws"] = (
                lambda x, c, k=noises: _evidence(pred, x, raw_i, k))
    if pred.head.cnn is not None:
        methods["Grad-CAM head.cnn_proj"] = gradcam("head.cnn_proj")
    scores = {k: {"lung": [], "border": [], "field": [], "centre": []} for k in methods}
    predicted = []
    panel = []
    for i in range(len(X)):
        x, c, raw_i = X[i], int(raw[i].argmax()), raw[i]
        lm = lung_proxy(x, ring)
        predicted.append(c)
        maps = {}
        for k, f in methods.items():
            m = f(x, c)
            maps[k] = m
            scores[k]["lung"].append(enrichment(m, lm))
            scores[k]["border"].append(enrichment(m, ring))
            scores[k]["field"].append(enrichment(m, field))
            scores[k]["centre"].append(enrichment(m, centre))
        if i < 5:
            panel.append((x[0].numpy(), lm.numpy(), {k: v.detach().numpy() for k, v in maps.items()}))
    _panel(panel, Path(run_dir).name, field.numpy(), centre.numpy())
    pos = np.array(predicted) == 1
    regions = {"lung field": field, "centre (between the lung fields)": centre, "border ring": ring}
    drops = {k: deletion(pred, X, calibrated, predicted, m) for k, m in regions.items()}
    return {"study": STUDY, "run_dir": str(run_dir), "images": len(X), "image_size": S,
            "layers": pred.layers, "subfeature": pred.cfg.classifier.subfeature,
            "methods": {k: {"lung_mean": float(np.mean(v["lung"])), "lung_std": float(np.std(v["lung"], ddof=1)),
                            "border_mean": float(np.mean(v["border"])),
                            "border_std": float(np.std(v["border"], ddof=1)),
                            "field_mean": float(np.mean(v["field"])), "field_std": float(np.std(v["field"], ddof=1)),
                            "field_positive_mean": float(np.mean(np.array(v["field"])[pos])) if pos.any() else None,
                            "centre_mean": float(np.mean(v["centre"])), "centre_std": float(np.std(v["centre"], ddof=1))}
                        for k, v in scores.items()},
            "deletion": {k: {"area": float(regions[k].float().mean()), "drops": v} for k, v in drops.items()},
            "positive_class": data.class_names[1], "n_predicted_positive": int(pos.sum())}


def _panel(panel, name: str, field=None, centre=None) -> None:
    from dcube.utils.plotting import pyplot  # literal text (no mathtext)

    plt = pyplot()
    cols = 2 + (field is not None) + (centre is not None) + len(panel[0][2])
    fig, ax = plt.subplots(len(panel), cols, figsize=(1.9 * cols, 2.0 * len(panel)))
    for r, (img, lm, maps) in enumerate(panel):
        items = [("image", img, "gray"), ("lung proxy", lm, "gray")] + \
            ([("lung field\n(mean train image)", field, "gray")] if field is not None else []) + \
            ([("centre\n(between the fields)", centre, "gray")] if centre is not None else []) + \
            [(k, v, "jet") for k, v in maps.items()]
        for c, (t, im, cmap) in enumerate(items):
            ax[r, c].imshow(im, cmap=cmap)
            ax[r, c].axis("off")
            if r == 0:
                ax[r, c].set_title(t.replace(" (", "\n(").replace(" head", "\nhead"), fontsize=7)
    fig.tight_layout()
    out = RESULTS / STUDY / f"{name}-panel.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def _deletion_contrasts(deletion: dict) -> list[str]:
    """Each other region's drop minus the lung field's, paired over the same images: the mean with a 95 %
    bootstrap CI (scipy, 2,000 resamples, seeded) and a Wilcoxon signed-rank p."""
    import numpy as np
    from scipy.stats import bootstrap, wilcoxon

    from dcube.evaluate.stats import format_p, holm

    ref = "lung field"
    if ref not in deletion:
        return []
    found = []
    for k, v in deletion.items():
        if k == ref:
            continue
        d = np.asarray(v["drops"]) - np.asarray(deletion[ref]["drops"])
        ci = bootstrap((d,), np.mean, n_resamples=2000, confidence_level=0.95, method="percentile",
                       random_state=0).confidence_interval
        found.append((k, d, ci, wilcoxon(d).pvalue if np.any(d != 0) else 1.0))
    # the family: these contrasts, Holm-adjusted together
    return [f"- {k} minus lung field, paired over the {len(d)} images: {d.mean():+.3f} [{ci.low:+.3f}, "
            f"{ci.high:+.3f}], {format_p(p, 'Wilcoxon p')}, {format_p(q, 'Holm p')}"
            for (k, d, ci, p), q in zip(found, holm([f[3] for f in found]))]


def table() -> str:
    import statistics

    from bench.common import load_results, mean_std

    lines = [f"## Where the heat maps point\n\nCommand: `python -m bench.heatmaps --run-dir runs/demo` (after "
             f"`make demo`). Machine: {machine()}. Each method's map of the predicted class on seeded VALIDATION "
             "images; enrichment = the map's share inside a region / the region's share of the image (1: no "
             "preference). Lung proxy: interior pixels darker than the interior median (no lung masks ship "
             "with PneumoniaMNIST; see the panel). Lung field: the same rule on the mean training image (a fixed "
             "region that keeps opacified lung, which the per-image proxy drops). mean ± std over images.\n"]
    for r in load_results(STUDY):
        lines += [f"Run `{Path(r['run_dir']).name}` ({r['image_size']} px, layers {', '.join(r['layers'])}, "
                  f"sub-features {r['subfeature']}), {r['images']} images, {r['date']}:\n",
                  "| method | lung enrichment (per-image proxy) | lung-field enrichment | lung-field, images "
                  f"predicted {r.get('positive_class', 'positive')} ({r.get('n_predicted_positive', '-')}) | "
                  "centre enrichment (between the lung fields) | border enrichment |", "|---|---|---|---|---|---|"]
        ms = lambda v, k: f"{v[k + '_mean']:.2f} ± {v[k + '_std']:.2f}" if k + "_mean" in v else "-"  # noqa: E731
        for k, v in r["methods"].items():
            fp = v.get("field_positive_mean")
            lines.append(f"| {k} | {ms(v, 'lung')} | {ms(v, 'field')} | {'-' if fp is None else f'{fp:.2f}'} | "
                         f"{ms(v, 'centre')} | {ms(v, 'border')} |")
        if "deletion" in r:
            lines += ["", "What the model rests on, without an attribution method: each region replaced by the "
                      "image's mean, the drop of the predicted class's calibrated probability (mean ± std over the "
                      "images; *per unit area*: the drop divided by the region's share of the image).", "",
                      "| region replaced | share of the image | probability drop | per unit area |", "|---|---|---|---|"]
            for k, v in r["deletion"].items():
                lines.append(f"| {k} | {v['area']:.2f} | {mean_std(v['drops'])} | "
                             f"{statistics.mean(v['drops']) / v['area']:.3f} |")
            lines += ["", *_deletion_contrasts(r["deletion"])]
        lines.append(f"\n![maps](bench/results/{STUDY}/{Path(r['run_dir']).name}-panel.png)\n")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    jobs = [(f"{Path(a.run_dir).name}-n{a.images}", lambda: measure(a.run_dir, a.images))]
    return run_study(STUDY, jobs, table, a.table_only)


if __name__ == "__main__":
    sys.exit(main())
