"""dcube.utils.plotting.save_image_rows: every image lands in its row, in order, with nothing else dark."""

import numpy as np
import pytest
import torch
from PIL import Image

from dcube.utils.plotting import save_image_rows


def test_image_rows_put_each_image_in_its_row_and_column(tmp_path):
    white = torch.ones(3, 1, 16, 16)
    black = -torch.ones(2, 1, 16, 16)  # row 2 holds 2 of the 4 places: the rest stays white
    out = save_image_rows([("white", white), ("black", black)], tmp_path / "g.png", per=4)
    img = np.asarray(Image.open(out).convert("L"), dtype=np.float64)
    h, w = img.shape
    assert w == 4 * 110 and abs(h / w - 2 * (6 + 16 + 1) / (4 * 17 - 1)) < 0.01  # title band, image, gap; 1.1 in per image
    top, bottom = img[: h // 2], img[h // 2:]
    dark = bottom < 60
    cols = np.flatnonzero(dark.sum(axis=0) > 0.5 * dark.sum(axis=0).max())
    assert cols.min() < 0.02 * w and 0.45 * w < cols.max() < 0.52 * w  # images 1 and 2 of 4, from the left
    assert (top < 60).sum() < 0.01 * top.size  # white images and a title: almost no dark pixel
    with pytest.raises(ValueError, match="no image"):
        save_image_rows([("empty", torch.empty(0, 1, 16, 16))], tmp_path / "e.png")
