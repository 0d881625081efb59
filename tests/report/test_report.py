"""report.html: one self-contained page, every run string escaped, checked in headless Chromium."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from dcube.cli import main

EVIL = "<script>alert(1)</script>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished micro run on a CSV dataset whose second class is named like a script tag."""
    tmp = tmp_path_factory.mktemp("report")
    rows = ["path,label"]
    for k, label in enumerate(["normal", EVIL]):
        for i in range(16):
            img = np.random.default_rng(100 * k + i).integers(0, 120 + 100 * k, (16, 16), dtype=np.uint8)
            p = tmp / "img" / f"{k}_{i}.png"
            p.parent.mkdir(exist_ok=True)
            Image.fromarray(img).save(p)
            rows.append(f'img/{k}_{i}.png,"{label}"')
    (tmp / "m.csv").write_text("\n".join(rows))
    cfg = tmp / "cfg.yaml"
    cfg.write_text(f"""
run_dir: {tmp / 'run'}
threads: 1
data: {{source: csv, path: {tmp / 'm.csv'}, image_size: 16, val_fraction: 0.25, test_fraction: 0.25}}
diffusion: {{preset: micro, max_steps: 2, batch_size: 8}}
classifier: {{subfeature: none, epochs: 1, batch_size: 8}}
""")
    assert main(["run", str(cfg)]) == 0  # dcube run writes the report, with heat maps
    return tmp / "run"


def test_the_report_is_self_contained_and_escapes_every_run_string(finished):
    page = (finished / "report.html").read_text()
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) >= 9  # metrics plots, selection, samples, curves, heat maps
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    for section in ("Test metrics", "Calibration", "Data", "Layer selection", "Step 1", "training curves",
                    "Heat maps", "Configuration"):
        assert section in page, section
    assert "research use only" in page and (finished / "report_heatmaps").is_dir()


def test_dcube_report_rewrites_it_and_refuses_an_unfinished_run(finished, tmp_path, capsys):
    (finished / "report.html").unlink()
    assert main(["report", str(finished), "--heatmaps", "0"]) == 0
    assert (finished / "report.html").exists()
    assert main(["report", str(tmp_path)]) == 2
    assert "not a finished dcube run" in capsys.readouterr().err


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", *args], capture_output=True, text=True, timeout=120)


def test_the_report_in_headless_chromium(finished, tmp_path):
    """Not blank, no console errors, every image loads, and the script-named class is text, not a script."""
    if CHROMIUM is None:
        msg = "Debian's chromium is not installed (make test installs it where apt-get can)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    url = (finished / "report.html").resolve().as_uri()
    dom = _chromium("--dump-dom", url)
    assert 'data-images="' in dom.stdout, dom.stderr[-2000:]
    loaded, total = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout).groups()
    assert loaded == total and int(total) >= 6  # plots, the DDIM grid, heat maps (the DDPM grid is opt-in)
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom.stdout and EVIL not in dom.stdout
    shot = tmp_path / "shot.png"
    _chromium("--window-size=1200,3000", f"--screenshot={shot}", url)
    pixels = np.asarray(Image.open(shot).convert("L"), np.float32)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text and figures, not a blank page
