"""``dcube report RUN_DIR``: one self-contained ``report.html`` per run (also written by ``dcube run``).

It holds the config and the data summary (class counts per split), the layer selection and its plot,
the step-1 sample grids, the training curves, the test metrics with 95 % CIs, calibration and the
operating point, the confusion matrix, ROC and reliability diagram, and a few heat maps (Grad-CAM and
the denoiser's evidence map of test images, drawn by ``dcube predict``'s code). Every string from the
run (class names, paths, config values) is HTML-escaped; every image is embedded as a data URI, so the
file can be mailed or archived alone. A two-line script marks images that fail to load.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import yaml

from dcube.config import read_run_config
from dcube.data import DataError, load_data
from dcube.evaluate.calibration import calibration_warning
from dcube.predict import NOTICE, Item, Predictor
from dcube.predict import write_prediction_heatmaps as draw
from dcube.utils.io import atomic_write_text
from dcube.utils.runtime import package_versions

REPORT = "report.html"
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.85em;max-height:28em}
img{max-width:100%;border:1px solid #ddd;margin:.3em 0}.grid img{max-width:48%}.note{color:#666;font-size:.9em}
.broken{outline:3px solid #c00}.notice{background:#fff3cd;padding:.5em .8em;border:1px solid #e0c97a}"""
_SCRIPT = """window.addEventListener("load",function(){var i=document.images,ok=0;for(var k=0;k<i.length;k++)
{if(i[k].complete&&i[k].naturalWidth>0)ok++;else i[k].classList.add("broken");}
document.body.setAttribute("data-images",ok+"/"+i.length);});"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="note">({esc(path.name)} was not made in this run)</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}" title="{esc(alt)}">'


def _table(header: list, rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def _metrics_section(m: dict) -> str:
    test, val, ci = m["test"], m.get("val", {}), m["test"].get("ci95", {})
    rows = []
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "auc"):
        lo_hi = ci.get(key)
        rows.append([key, _fmt(test.get(key)), f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "-",
                     _fmt(val.get(key))])
    out = [_table(["metric", "test", "test 95 % CI", "validation (chosen epoch)"], rows),
           f'<p class="note">{esc(ci.get("method", ""))}; {esc(test.get("n"))} test images; AUC: '
           f'{esc(test.get("auc_method", ""))}</p>']
    per = test.get("per_class") or {}
    if per:
        out.append(_table(["class", "precision", "recall", "f1", "support"],
                          [[c, _fmt(v.get("precision")), _fmt(v.get("recall")), _fmt(v.get("f1")), v.get("support")]
                           for c, v in per.items()]))
    cal = m.get("calibration") or {}
    if cal:
        rows = [["temperature (fitted on validation)", _fmt(cal.get("temperature"))]]
        for split in ("val", "test"):
            s = cal.get(split) or {}
            rows.append([f"{split} ECE before -> after", f"{_fmt(s.get('ece_before'))} -> {_fmt(s.get('ece_after'))}"])
            rows.append([f"{split} NLL before -> after", f"{_fmt(s.get('nll_before'))} -> {_fmt(s.get('nll_after'))}"])
        op = (cal.get("operating_point") or {}).get("test")
        if op:
            rows.append(["operating point: threshold (validation)", _fmt(op.get("threshold"))])
            rows.append(["test sensitivity [95 % CI]", f"{_fmt(op.get('sensitivity'))} {op.get('sensitivity_ci95')}"])
            rows.append(["test specificity [95 % CI]", f"{_fmt(op.get('specificity'))} {op.get('specificity_ci95')}"])
        out += ["<h3>Calibration and operating point</h3>", _table(["", "value"], rows)]
        if (warning := calibration_warning(cal)) is not None:
            out.append(f'<p class="note">{esc(warning)}</p>')
    return "\n".join(out)


def _data_section(info: dict) -> str:
    counts = info.get("class_counts") or {}
    names = info.get("class_names") or []
    rows = [[c] + [counts.get(s, {}).get(c, 0) for s in ("train", "val", "test")] for c in names]
    extra = [["source", info.get("source")], ["path", info.get("path")], ["image size", info.get("image_size")],
             ["channels", info.get("channels")], ["sha256", info.get("sha256")]]
    g = info.get("grouping") or {}
    if g:
        extra.append(["duplicate groups merged into one split", g.get("duplicate_groups")])
    return _table(["class", "train", "val", "test"], rows) + _table(["", ""], extra)


def _selection_section(run_dir: Path) -> str:
    path = run_dir / "features" / "selection.json"
    if not path.is_file():
        return '<p class="note">(no layer selection)</p>'
    sel = json.loads(path.read_text())
    stats, pv = sel.get("statistics") or {}, sel.get("pvalues") or {}
    rows = [[n, "yes" if n in sel.get("names", []) else "", _fmt(stats.get(n)), _fmt(pv.get(n))]
            for n in sel.get("order") or sel.get("names", [])]
    return (f"<p>Method <b>{esc(sel.get('method', 'manual'))}</b>; selected: <b>{esc(', '.join(sel.get('names', [])))}</b>. "
            f"{esc(sel.get('note') or '')}</p>" + _table(["layer", "selected", "effect / statistic", "p-value"], rows)
            + _img(run_dir / "features" / "ks_pvalues.png", "layer selection"))


def write_test_heatmaps(run_dir: Path, n: int) -> list[Path]:
    """Grad-CAM + evidence overlays of `n` test images (alternating classes), via dcube.predict; [] when the
    run's data cannot be read on this machine."""
    import numpy as np
    import torch

    pred = Predictor(run_dir)
    try:
        test = load_data(pred.cfg.data, pred.cfg.seed, run_dir).test
    except (DataError, FileNotFoundError, OSError):
        return []
    order = [int(i) for c in range(len(pred.class_names)) for i in torch.nonzero(test.labels == c).flatten()[:1]]
    order = (order + [i for i in range(len(test)) if i not in order])[:n]
    images = test.images[order]
    raw, cal = pred(images)
    rows = [{**{f"raw_prob_{c}": float(v) for c, v in zip(pred.class_names, r)},
             **{f"prob_{c}": float(v) for c, v in zip(pred.class_names, p)}} for r, p in zip(raw, cal)]
    ok = [(Item(Path(f"test_{i:04d}_{pred.class_names[int(test.labels[i])]}")), np.asarray(x)) for i, x in zip(order, images)]
    out = run_dir / "report_heatmaps"
    draw(pred, ok, rows, out, n)
    return [Path(r[k]) for r in rows for k in ("gradcam", "diffusion_map") if k in r]


def _choice_section(choice: dict | None) -> str:
    """classifier.subfeature: auto: each candidate CNN's best validation score and the one kept."""
    if not choice:
        return ""
    rows = [[name, f"{b['score']:.4f}", b["epoch"], "yes" if name == choice["chosen"] else ""]
            for name, b in choice["candidates"].items()]
    return (f'<p>Sub-feature CNN chosen on the {esc(choice["split"])} split ({esc(choice["metric"])}):</p>'
            + _table(["candidate", f"best {choice['metric']}", "epoch", "chosen"], rows))


def write_report(run_dir: str | Path, heatmaps: int = 2) -> Path:
    """Write RUN_DIR/report.html from the run's files (see the module doc) -> its path."""
    run_dir = Path(run_dir)
    for need in ("config.yaml", "metrics.json", "run.json"):
        if not (run_dir / need).is_file():
            raise FileNotFoundError(f"{run_dir}: not a finished dcube run (missing {need}); run 'dcube run' first")
    cfg = read_run_config(run_dir / "config.yaml")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    info = json.loads((run_dir / "run.json").read_text())
    maps = write_test_heatmaps(run_dir, heatmaps) if heatmaps > 0 else []
    title = f"dcube run {run_dir.name}"
    parts = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="notice">{esc(NOTICE)}. dcube {esc(package_versions()["dcube"])}; run directory '
        f"<code>{esc(run_dir.resolve())}</code>; dataset {esc(metrics.get('dataset'))}, seed {esc(metrics.get('seed'))}.</p>",
        "<h2>Test metrics</h2>", _metrics_section(metrics),
        '<div class="grid">' + _img(run_dir / "confusion.png", "confusion matrix") + _img(run_dir / "roc.png", "ROC")
        + "</div>", _img(run_dir / "reliability.png", "reliability diagram (before / after temperature scaling)"),
        "<h2>Data</h2>", _data_section(info.get("data") or {}),
        "<h2>Layer selection</h2>", _selection_section(run_dir),
        "<h2>Step 1: samples of the diffusion model</h2>",
        '<div class="grid">' + _img(run_dir / "diffusion" / "samples.png", "DDIM samples")
        + _img(run_dir / "diffusion" / "samples_ddpm.png", "DDPM samples") + "</div>",
        _img(run_dir / "diffusion" / "probe_curve.png", "step-1 validation probe curve")
        if (run_dir / "diffusion" / "probe_curve.png").exists() else "",
        "<h2>Step 2: training curves</h2>", _choice_section(metrics.get("subfeature_choice")),
        _img(run_dir / "classifier" / "curves.png", "training curves"),
        "<h2>Heat maps (test images)</h2>",
        ('<div class="grid">' + "".join(_img(p, p.stem) for p in maps) + "</div>") if maps else
        '<p class="note">(none: the run\'s data is not readable here, or heat maps were not asked for)</p>',
        "<h2>Configuration</h2>", f"<pre>{esc(yaml.safe_dump(cfg, sort_keys=False))}</pre>",
        "<h2>Timings (s)</h2>", _table(["stage", "seconds"], [[k, v] for k, v in (info.get("timings_s") or {}).items()]),
    ]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>{''.join(parts)}</body></html>")
    return atomic_write_text(run_dir / REPORT, page)
