"""Using a finished run: ``dcube predict RUN_DIR INPUT...`` (new images), ``dcube report RUN_DIR``
(report.html) and ``dcube export RUN_DIR`` (one model file)."""

from __future__ import annotations

import sys
from pathlib import Path

from dcube.cli.common import Formatter, guard


@guard
def cmd_predict(args) -> int:
    """0: every input predicted; 1: some inputs could not be read (named on stderr); 2: nothing to do."""
    from dcube.predict import NOTICE, FrameSelection, predict_files

    args._run_dir = args.run_dir
    out = Path(args.out) if args.out else Path(args.run_dir) / "predictions"
    rows, failed = predict_files(args.run_dir, args.inputs, out, args.batch_size, args.device, args.heatmaps,
                                 FrameSelection(args.frame, args.axis, args.slices))
    for it in failed:
        print(f"dcube: cannot predict {it.name}: {it.error}", file=sys.stderr)
    print(f"predicted {len(rows)} image(s), {len(failed)} failed -> {out / 'predictions.csv'} ({NOTICE})")
    if not rows:
        return 2
    return 1 if failed else 0


@guard
def cmd_report(args) -> int:
    """Write RUN_DIR/report.html: config, data, selection, samples, curves, metrics with CIs, calibration,
    plots and a few heat maps, all in one self-contained file."""
    from dcube.report import write_report

    args._run_dir = args.run_dir
    print(f"report: {write_report(args.run_dir, args.heatmaps)}")


@guard
def cmd_export(args) -> int:
    """Write the run's model (frozen denoiser layers + sub-feature CNN + head + temperature) as one
    TorchScript or ONNX file: images (N, C, S, S) in [-1, 1] -> calibrated probabilities; + a JSON sidecar."""
    from dcube.export import export

    args._run_dir = args.run_dir
    print(f"exported: {export(args.run_dir, args.format, args.out)}")


@guard
def cmd_compare(args) -> int:
    """Mean over A's runs minus mean over B's of a test metric, on the same test images: its 95 % CI and p from a
    two-level bootstrap (images, then runs), so that the runs' training noise is in the CI. Works for any run
    whose metrics.json holds the per-image test record (dcube run, dcube train-baseline)."""
    from dcube.compare import compare_runs
    from dcube.evaluate.stats import format_p

    r = compare_runs(args.runs, args.against, args.metric)
    print(f"{args.metric}: A ({r['seeds_a']} run(s)) {r['a']:.4f}, B ({r['seeds_b']} run(s)) {r['b']:.4f}; A minus B "
          f"{r['diff']:+.4f} [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}], {format_p(r['p'])} ({r['n_test']} test images; "
          f"{r['method']})")


def register(sub) -> None:
    ep = sub.add_parser("export", help="the run's model as one TorchScript or ONNX file",
                        description=cmd_export.__doc__, formatter_class=Formatter)
    ep.add_argument("run_dir", help="a finished run directory (dcube run)")
    ep.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript", help="file format")
    ep.add_argument("--out", help="output file (default RUN_DIR/export/model.pt or model.onnx)")
    ep.set_defaults(func=cmd_export)
    cp = sub.add_parser("compare", help="runs A minus runs B on the same test images (paired, two-level bootstrap)",
                        description=cmd_compare.__doc__, formatter_class=Formatter)
    cp.add_argument("runs", nargs="+", help="run directories (or metrics.json files) of arm A, e.g. one per seed")
    cp.add_argument("--against", nargs="+", required=True, help="the runs of arm B (paired with A's by position "
                    "when as many)")
    cp.add_argument("--metric", default="auc", choices=("auc", "accuracy", "balanced_accuracy", "f1_macro"),
                    help="the test metric compared")
    cp.set_defaults(func=cmd_compare)
    rp = sub.add_parser("report", help="write RUN_DIR/report.html (one self-contained page)",
                        description=cmd_report.__doc__, formatter_class=Formatter)
    rp.add_argument("run_dir", help="a finished run directory (dcube run)")
    rp.add_argument("--heatmaps", type=int, default=2, metavar="N", help="heat maps of N test images")
    rp.set_defaults(func=cmd_report)
    pp = sub.add_parser("predict", help="apply a trained run to new images (PNG/JPEG/TIFF/BMP, DICOM, NIfTI; files, folders, CSV)",
                        description=cmd_predict.__doc__, formatter_class=Formatter)
    pp.add_argument("run_dir", help="a finished run directory (dcube run)")
    pp.add_argument("inputs", nargs="+", help="image, DICOM or NIfTI (.nii/.nii.gz) files, folders (recursive) or CSVs "
                                              "with a 'path' column")
    pp.add_argument("--frame", type=int, help="multi-frame DICOM: only this frame (0-based; default: every frame)")
    pp.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="NIfTI: the axis the volume is sliced along")
    pp.add_argument("--slices", metavar="A:B", help="NIfTI: a range of slice indices, Python style (default: all)")
    pp.add_argument("--out", help="output folder for predictions.csv/.json (default RUN_DIR/predictions)")
    pp.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    pp.add_argument("--device", default="cpu", help="cpu or cuda")
    pp.add_argument("--heatmaps", nargs="?", type=int, const=20, default=0, metavar="N",
                    help="Grad-CAM and diffusion-evidence overlays of the first N images (N without a value: 20)")
    pp.set_defaults(func=cmd_predict)
