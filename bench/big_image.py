"""Peak memory of reading one very large image (issue 14): a 12,000 x 12,000 PNG and JPEG read at 28 px.

    python -m bench.big_image [--size 12000] [--table-only]

"full decode" is the reader without a target size (dcube <= 0.1: decode every pixel, then a float32
copy, then resize); "reduced" is today's reader (`read_image`: JPEG DCT scaling via PIL ``draft``,
then PIL ``reduce`` to about twice the target before the float conversion). Each reading runs in a
fresh process, so its peak RSS (VmHWM) is its own; the baseline is that process's RSS before reading.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import machine, run_study

STUDY = "big_image"
_CHILD = r"""
import json, sys
from pathlib import Path
import numpy as np
from dcube.data import images as im
def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
path, mode = sys.argv[1], sys.argv[2]
Path("/proc/self/clear_refs").write_text("5")
before = hwm()
x = im._read_pil(Path(path), None, None if mode == "full" else 28)
x = im._resize(im._fit_channels(x, 1), 28)
print(json.dumps({"baseline_mb": round(before, 1), "peak_mb": round(hwm(), 1), "mean": float(np.mean(x))}))
"""


def _make(path: Path, size: int) -> None:
    import numpy as np
    from PIL import Image

    img = np.empty((size, size), np.uint8)  # a smooth pattern: compresses well, like a scan
    cols = np.sin(np.arange(size) / 97.0)
    for r in range(0, size, 1000):
        rows = np.cos(np.arange(r, min(r + 1000, size)) / 131.0)[:, None]
        img[r:r + 1000] = ((rows * cols[None] + 1) * 127).astype(np.uint8)
    Image.MAX_IMAGE_PIXELS = None
    Image.fromarray(img).save(path)


def measure(fmt: str, mode: str, size: int) -> dict:
    from PIL import Image

    tmp = Path(tempfile.gettempdir()) / f"dcube-big-{size}.{fmt}"
    if not tmp.exists():
        png = tmp.with_suffix(".png")
        if not png.exists():
            _make(png, size)
        if fmt != "png":
            Image.MAX_IMAGE_PIXELS = None
            with Image.open(png) as img:
                img.save(tmp, quality=90)
    code = "import PIL.Image; PIL.Image.MAX_IMAGE_PIXELS = None\n" + _CHILD
    out = subprocess.run([sys.executable, "-c", code, str(tmp), mode], check=True, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"study": STUDY, "format": fmt, "mode": mode, "size": size, **res,
            "added_mb": round(res["peak_mb"] - res["baseline_mb"], 1), "peak_rss_mb": res["peak_mb"]}


def table() -> str:
    from bench.common import load_results

    rows = load_results(STUDY)
    lines = [f"## Reading one very large image\n\nCommand: `python -m bench.big_image`. Machine: {machine()}. "
             "One grayscale image of size x size pixels read at 28 px, each reading in a fresh process; "
             "*added* = peak RSS (VmHWM) minus the process's RSS before reading. dcube refuses a file above "
             "100 M pixels (`dcube.data.images.MAX_PIXELS`); this measures the reader itself.\n",
             "| format | size | full decode: added MB | reduced: added MB | same image mean (28 px) | date |",
             "|---|---|---|---|---|---|"]
    for fmt in ("png", "jpg"):
        by = {r["mode"]: r for r in rows if r["format"] == fmt}
        if set(by) >= {"full", "reduced"}:
            f, r = by["full"], by["reduced"]
            lines.append(f"| {fmt} | {f['size']} | {f['added_mb']:.0f} | {r['added_mb']:.0f} | "
                         f"{f['mean']:.3f} vs {r['mean']:.3f} | {r['date']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=12_000)
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    jobs = ((f"{fmt}-{mode}-{a.size}", (lambda f=fmt, m=mode: measure(f, m, a.size)))
            for fmt in ("png", "jpg") for mode in ("full", "reduced"))
    return run_study(STUDY, jobs, table, a.table_only)


if __name__ == "__main__":
    sys.exit(main())
