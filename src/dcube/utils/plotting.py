"""The one way dcube gets matplotlib: the headless Agg backend, and text drawn literally.

Class names and file names come from the data; with mathtext on, a label such as ``$5 copay`` made
matplotlib raise after all the training. ``text.parse_math = False`` draws every string as written.
"""

from __future__ import annotations


def literal_text() -> None:
    import matplotlib

    matplotlib.rcParams["text.parse_math"] = False


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, with literal text."""
    import matplotlib

    matplotlib.use("Agg")
    literal_text()
    import matplotlib.pyplot as plt

    return plt


def save_image_rows(rows, path, per: int = 8, inches: float = 1.1):
    """One PNG of image rows: ``rows`` = [(title, images (N, C, H, W) in [-1, 1])], up to `per` images a row,
    the title above it. Drawn as one mosaic in one axes: a figure of one small axes per image spent about a
    second per grid in matplotlib's layout."""
    import numpy as np
    import torch

    from dcube.utils.io import atomic_write

    first = next((imgs for _, imgs in rows if len(imgs)), None)
    if first is None:
        raise ValueError("save_image_rows: no image in any row")
    c, h, w = first.shape[1:]
    pad, band = max(1, w // 14), max(6, int(0.3 * h))  # gap between images; room for a row's title
    height = band + h + pad
    mosaic = np.ones((len(rows) * height, per * (w + pad) - pad, c), dtype=np.float32)  # white
    for r, (_, imgs) in enumerate(rows):
        for j, img in enumerate(torch.as_tensor(imgs)[:per]):
            top, left = r * height + band, j * (w + pad)
            mosaic[top:top + h, left:left + w] = ((img.float().permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
    plt = pyplot()
    fig = plt.figure(figsize=(inches * per, inches * per * mosaic.shape[0] / mosaic.shape[1]))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(mosaic[..., 0] if c == 1 else mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for r, (title, _) in enumerate(rows):
        ax.text(0, r * height + band - 1, title, fontsize=8, va="bottom", ha="left")
    ax.axis("off")
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out
