"""Reading single image files: DICOM (every shared file), PNG variants, corrupt files, arrays."""

import numpy as np
import pytest
import torch
from PIL import Image

from dcube.data import DataError, read_image
from dcube.data.dicom import read_dicom
from dcube.data.images import array_to_tensor

DICOMS = ["693_UNCR.dcm", "CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm", "US1_UNCR.dcm",
          "emri_small.dcm"]


@pytest.fixture
def dicom_dir(shared_data):
    return shared_data / "dicom"


@pytest.mark.parametrize("name", DICOMS)
@pytest.mark.parametrize("channels", [1, 3])
def test_dicom_reads(dicom_dir, name, channels):
    x = read_image(dicom_dir / name, 32, channels)
    assert x.shape == (channels, 32, 32) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    assert x.max() - x.min() > 1.0  # windowing spreads the values


def _corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_monochrome1_is_inverted(dicom_dir):
    import pydicom

    raw = pydicom.dcmread(dicom_dir / "RG1_UNCR.dcm").pixel_array.astype(np.float32)
    naive = (raw - raw.min()) / (raw.max() - raw.min())
    naive = np.asarray(Image.fromarray(naive).resize((64, 64), Image.Resampling.BILINEAR))
    ours = read_image(dicom_dir / "RG1_UNCR.dcm", 64, 1)[0]
    assert _corr(ours, naive) < -0.9
    mono2 = read_image(dicom_dir / "CT_small.dcm", 64, 1)[0]  # MONOCHROME2: not inverted
    raw2 = pydicom.dcmread(dicom_dir / "CT_small.dcm").pixel_array.astype(np.float32)
    naive2 = np.asarray(Image.fromarray(raw2).resize((64, 64), Image.Resampling.BILINEAR))
    assert _corr(mono2, naive2) > 0.9


def test_ct_rescale_and_padding(dicom_dir):
    import pydicom

    ds = pydicom.dcmread(dicom_dir / "693_UNCR.dcm")
    x = read_dicom(dicom_dir / "693_UNCR.dcm")
    pad = ds.pixel_array == ds.PixelPaddingValue
    assert pad.any() and (x[pad] == 0).all()  # padding is background, not part of the window
    assert x[~pad].max() == 1.0 and 0.2 < x[~pad].mean() < 0.8


def test_multiframe_uses_middle_frame(dicom_dir):
    import pydicom

    frames = pydicom.dcmread(dicom_dir / "emri_small.dcm").pixel_array
    x = read_dicom(dicom_dir / "emri_small.dcm")
    assert x.shape == frames.shape[1:]
    assert _corr(x, frames[len(frames) // 2]) > 0.99
    assert _corr(x, frames[0]) < _corr(x, frames[len(frames) // 2])


def test_rgb_ultrasound(dicom_dir):
    x = read_image(dicom_dir / "US1_UNCR.dcm", 64, 3)
    assert not np.allclose(x[0], x[1])  # colour kept
    gray = read_image(dicom_dir / "US1_UNCR.dcm", 64, 1)
    assert gray.shape == (1, 64, 64)


def test_png_modes(tmp_path):
    rng = np.random.default_rng(0)
    g = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    x = read_image(tmp_path / "g.png", 20, 1)
    assert x.shape == (1, 20, 20) and x.min() >= -1 and x.max() <= 1
    Image.fromarray(g[:, :20]).save(tmp_path / "sq.png")
    np.testing.assert_allclose(read_image(tmp_path / "sq.png", 20, 1)[0], g[:, :20] / 127.5 - 1,
                               atol=1e-6)  # same size: exact scaling, no resampling
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.jpg")
    assert read_image(tmp_path / "c.jpg", 8, 3).shape == (3, 8, 8)
    assert read_image(tmp_path / "c.jpg", 8, 1).shape == (1, 8, 8)
    Image.fromarray((rng.integers(0, 4096, (16, 16))).astype(np.uint16)).save(tmp_path / "h.png")
    h = read_image(tmp_path / "h.png", 16, 1)
    assert h.min() == -1 and h.max() == 1  # 16-bit: windowed


@pytest.mark.parametrize("content", [b"", b"garbage bytes, not a png" * 10, None])
def test_corrupt_image(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is None:  # a truncated PNG
        Image.fromarray(np.zeros((64, 64), np.uint8) + 7).save(path)
        content = path.read_bytes()[:60]
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.png"):
        read_image(path, 16, 1)


def test_corrupt_dicom(tmp_path):
    path = tmp_path / "bad.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"junk" * 20)
    with pytest.raises(DataError, match="bad.dcm"):
        read_image(path, 16, 1)


def test_array_to_tensor():
    a = np.array([[[0, 255], [255, 0]]], np.uint8)
    t = array_to_tensor(a, 2, 1)
    assert torch.equal(t, torch.tensor([[[[-1.0, 1.0], [1.0, -1.0]]]]))
    rgb = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 3), dtype=np.uint8)
    t = array_to_tensor(rgb, 64, 1)
    assert t.shape == (5, 1, 64, 64) and t.min() >= -1 and t.max() <= 1


def test_an_image_over_max_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    import dcube.data.images as images

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "big.png")
    assert read_image(tmp_path / "big.png", 8, 1).shape == (1, 8, 8)  # 256 pixels: under MAX_PIXELS
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(DataError, match=r"big.png: 16 x 16 pixels is more than 100"):
        read_image(tmp_path / "big.png", 8, 1)
