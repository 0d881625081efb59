"""dcube predict: the run's own preprocessing and model on files, equal to the evaluate step."""

import json

import numpy as np
import pytest
from PIL import Image

from dcube.cli import main
from dcube.config import from_dict
from dcube.pipeline import run


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    cfg = from_dict({
        "run_dir": str(d / "run"), "seed": 0,
        "data": {"source": "medmnist", "name": "pneumoniamnist", "download": False,
                 "path": str(shared_data / "medmnist" / "pneumoniamnist.npz"),
                 "max_train": 128, "max_val": 64, "max_test": 40},
        "diffusion": {"backbone": "unet", "preset": "micro", "max_steps": 4, "batch_size": 32, "sample_grid": False},
        "classifier": {"subfeature": "none", "epochs": 1, "batch_size": 32, "target_sensitivity": 0.9}})
    run(cfg)
    return d, cfg


def test_predict_equals_the_evaluate_step_on_the_test_split(trained):
    from dcube.data import load_data

    d, cfg = trained
    test = load_data(cfg.data, cfg.seed).test
    folder = d / "pngs"
    folder.mkdir()
    for i, x in enumerate(test.images):  # the uint8 pixels back as PNG files
        Image.fromarray(np.round((x[0].numpy() + 1) / 2 * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    rc = main(["predict", str(d / "run"), str(folder), "--out", str(d / "out")])
    assert rc == 1  # one input failed, the others were predicted
    out = json.loads((d / "out" / "predictions.json").read_text())
    assert out["notice"].startswith("research use only") and len(out["model_sha256"]["head"]) == 64
    assert [f["path"].endswith("broken.png") for f in out["failed"]] == [True]
    raw = np.array([[r[f"raw_prob_{n}"] for n in out["class_names"]] for r in out["predictions"]])
    expected = np.array(json.loads((d / "run" / "metrics.json").read_text())["test_probs"])
    assert raw.shape == expected.shape and np.abs(raw - expected).max() < 1e-5
    assert all("decision" in r for r in out["predictions"])  # the run has an operating point
    assert (d / "out" / "predictions.csv").read_text().startswith("# research use only")


def test_predict_reads_every_real_dicom(trained, shared_data, capsys):
    d, _ = trained
    import pydicom

    rc = main(["predict", str(d / "run"), str(shared_data / "dicom"), "--out", str(d / "dcm")])
    out = json.loads((d / "dcm" / "predictions.json").read_text())
    files = sorted((shared_data / "dicom").glob("*.dcm"))
    frames = {f.name: int(pydicom.dcmread(f, stop_before_pixels=True).get("NumberOfFrames", 1) or 1) for f in files}
    assert max(frames.values()) > 1  # emri_small.dcm: a multi-frame MR
    assert rc == 0 and len(out["predictions"]) == sum(frames.values())  # every frame is an image
    for r in out["predictions"]:
        assert abs(sum(r[f"prob_{n}"] for n in out["class_names"]) - 1) < 1e-6
    multi = [r for r in out["predictions"] if r["path"].endswith("emri_small.dcm")]
    assert [r["frame"] for r in multi] == list(range(frames["emri_small.dcm"]))
    assert len({round(r["raw_prob_" + out["class_names"][1]], 6) for r in multi}) > 1  # frames differ
    rc = main(["predict", str(d / "run"), str(shared_data / "dicom" / "emri_small.dcm"), "--frame", "3",
               "--out", str(d / "one")])
    one = json.loads((d / "one" / "predictions.json").read_text())["predictions"]
    assert rc == 0 and [r["frame"] for r in one] == [3]
    # frame 3 alone = frame 3 of the whole file, up to the batch-size-dependent rounding of the CPU's
    # kernels (8e-7 on an AVX-512 machine), and nearer to it than to any other frame
    key = "raw_prob_" + out["class_names"][1]
    gaps = [abs(one[0][key] - r[key]) for r in multi]
    assert gaps[3] < 1e-5 and gaps[3] == min(gaps)


def test_nifti_volumes_are_predicted_slice_by_slice_like_the_same_pngs(trained, tmp_path):
    """A NIfTI volume built here from test images: every slice along the axis (or a range) is one row, and
    its prediction equals that of the same slice saved as a PNG (the volume's window maps 0..255 to 0..1)."""
    import nibabel as nib

    from dcube.data import load_data

    d, cfg = trained
    test = load_data(cfg.data, cfg.seed).test
    imgs = np.round((test.images[:4, 0].numpy() + 1) / 2 * 255).astype(np.uint8)
    imgs[:, 0, :8] = 0  # >= 0.5 % of the voxels at 0 and at 255: the volume's robust window is exactly 0..255
    imgs[:, -1, :8] = 255
    for i, x in enumerate(imgs):
        Image.fromarray(x).save(tmp_path / f"s{i}.png")
    vol = np.ascontiguousarray(imgs.transpose(1, 2, 0)).astype(np.float32)  # (H, W, slices): axis 2
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "vol.nii.gz"))
    assert main(["predict", str(d / "run"), str(tmp_path / "vol.nii.gz"), "--out", str(tmp_path / "nii")]) == 0
    rows = json.loads((tmp_path / "nii" / "predictions.json").read_text())["predictions"]
    assert [(r["frame"], r["axis"]) for r in rows] == [(i, 2) for i in range(4)]
    assert main(["predict", str(d / "run"), *[str(tmp_path / f"s{i}.png") for i in range(4)],
                 "--out", str(tmp_path / "png")]) == 0
    png = json.loads((tmp_path / "png" / "predictions.json").read_text())["predictions"]
    key = [k for k in rows[0] if k.startswith("raw_prob_")]
    assert np.abs(np.array([[r[k] for k in key] for r in rows]) - np.array([[r[k] for k in key] for r in png])).max() < 1e-5
    assert main(["predict", str(d / "run"), str(tmp_path / "vol.nii.gz"), "--slices", "1:3", "--axis", "2",
                 "--out", str(tmp_path / "part")]) == 0
    part = json.loads((tmp_path / "part" / "predictions.json").read_text())["predictions"]
    assert [r["frame"] for r in part] == [1, 2]
    assert main(["predict", str(d / "run"), str(tmp_path / "vol.nii.gz"), "--axis", "0",
                 "--out", str(tmp_path / "ax0")]) == 0
    assert len(json.loads((tmp_path / "ax0" / "predictions.json").read_text())["predictions"]) == imgs.shape[1]


def test_dicom_windows_from_the_file_and_named_presets(shared_data):
    """data.dicom_window: the file's window centre/width, a named CT preset (HU), or the robust default."""
    import pydicom

    from dcube.data.dicom import WINDOW_PRESETS, read_dicom

    ct = shared_data / "dicom" / "CT_small.dcm"
    ds = pydicom.dcmread(ct)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    for name, (c, w) in WINDOW_PRESETS.items():
        x = read_dicom(ct, name)
        assert np.allclose(x, np.clip((hu - (c - w / 2)) / w, 0, 1), atol=1e-6), name
    assert not np.allclose(read_dicom(ct, "lung"), read_dicom(ct, "bone"))
    mr = shared_data / "dicom" / "MR_small.dcm"  # WindowCenter 600, WindowWidth 1600
    m = pydicom.dcmread(mr)
    assert np.allclose(read_dicom(mr, "file"), np.clip((m.pixel_array - (600 - 800)) / 1600, 0, 1), atol=1e-6)
    cr = shared_data / "dicom" / "RG1_UNCR.dcm"  # MONOCHROME1 with a window in the file: inverted after it
    r = pydicom.dcmread(cr)
    c, w = float(r.WindowCenter), float(r.WindowWidth)
    assert np.allclose(read_dicom(cr, "file"), 1 - np.clip((r.pixel_array - (c - w / 2)) / w, 0, 1), atol=1e-6)
    assert np.allclose(read_dicom(ct, "file"), read_dicom(ct, "percentile"))  # CT_small has no window: the default


def test_predict_refuses_an_unfinished_run(tmp_path, capsys):
    assert main(["predict", str(tmp_path), str(tmp_path)]) == 2
    assert "not a finished dcube run" in capsys.readouterr().err


def test_heatmaps_are_written_for_gradcam_and_the_diffusion_map(trained, shared_data):
    d, _ = trained
    rc = main(["predict", str(d / "run"), str(shared_data / "dicom" / "CT_small.dcm"), "--out", str(d / "hm"),
               "--heatmaps", "1"])
    out = json.loads((d / "hm" / "predictions.json").read_text())
    row = out["predictions"][0]
    assert rc == 0
    for key in ("gradcam", "diffusion_map"):
        assert row[key].startswith(str(d / "hm" / "heatmaps")) and open(row[key], "rb").read(4) == b"\x89PNG"


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_equals_predict_on_the_test_images(trained, fmt):
    """One model file (denoiser layers + head + temperature) whose outputs equal predict's within 1e-4."""
    import torch

    from dcube.data import load_data
    from dcube.predict import Predictor

    d, cfg = trained
    assert main(["export", str(d / "run"), "--format", fmt, "--out", str(d / f"model-{fmt}")]) == 0
    path = d / f"model-{fmt}"
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["format"] == fmt and side["notice"].startswith("research use only")
    x = load_data(cfg.data, cfg.seed).test.images
    _, expected = Predictor(d / "run")(x)
    if fmt == "torchscript":
        with torch.no_grad():
            got = torch.jit.load(str(path))(x).numpy()
    else:
        import onnxruntime as ort

        got = ort.InferenceSession(str(path)).run(None, {"images": x.numpy()})[0]
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4


def test_export_refuses_xt_runs(trained, tmp_path):
    import shutil

    import yaml

    from dcube.export import ExportedModel
    from dcube.predict import Predictor

    d, _ = trained
    shutil.copytree(d / "run", tmp_path / "run")
    c = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    c["features"]["input_mode"] = "xt"
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(c))
    with pytest.raises(ValueError, match="cannot be exported"):
        ExportedModel(Predictor(tmp_path / "run"))


def test_xt_mode_predictions_do_not_depend_on_the_batch(shared_data, tmp_path):
    """features.input_mode=xt: predict noises every file with one fixed draw, so an image's probabilities are
    the same alone and at any position in a batch (before, the draw followed the position)."""
    import torch

    from dcube.data import load_data
    from dcube.predict import Predictor

    cfg = from_dict({
        "run_dir": str(tmp_path / "run"), "seed": 0, "threads": 1,
        "data": {"source": "medmnist", "name": "pneumoniamnist", "download": False,
                 "path": str(shared_data / "medmnist" / "pneumoniamnist.npz"),
                 "max_train": 64, "max_val": 32, "max_test": 16},
        "diffusion": {"backbone": "unet", "preset": "micro", "max_steps": 2, "batch_size": 32, "sample_grid": False},
        "features": {"input_mode": "xt", "timestep": 200},
        "classifier": {"subfeature": "none", "epochs": 1, "batch_size": 32}})
    run(cfg)
    x = load_data(cfg.data, cfg.seed).test.images[:6]
    pred = Predictor(tmp_path / "run")
    alone, _ = pred(x[:1])
    in_batch, _ = pred(torch.cat([x[3:6], x[:1]]))
    assert np.abs(in_batch[3] - alone[0]).max() < 1e-4  # float rounding of another batch size only
    other, _ = pred(x[1:2])
    assert np.abs(other[0] - alone[0]).max() > 1e-6  # the noise is fixed, the image still matters


def test_maps_stored_at_map_size_are_what_predict_and_export_compute(shared_data, tmp_path):
    """features.map_size: the cached maps have no side above it (the 28x28 and 14x14 layers shrunk to
    8x8), and predict and export shrink the same way: their probabilities equal the evaluate step's."""
    import torch
    from safetensors import safe_open

    from dcube.data import load_data
    from dcube.predict import Predictor

    cfg = from_dict({
        "run_dir": str(tmp_path / "run"), "seed": 0,
        "data": {"source": "medmnist", "name": "pneumoniamnist", "download": False,
                 "path": str(shared_data / "medmnist" / "pneumoniamnist.npz"),
                 "max_train": 96, "max_val": 32, "max_test": 32},
        "diffusion": {"backbone": "unet", "preset": "micro", "max_steps": 2, "batch_size": 32, "sample_grid": False},
        "features": {"layers": ["down_0", "mid", "up_2"], "map_size": 8},
        "classifier": {"subfeature": "none", "epochs": 1, "batch_size": 32}})
    out = run(cfg)
    with safe_open(str(tmp_path / "run" / "features" / "test.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert shapes == {"down_0": [32, 8, 8, 8], "mid": [32, 16, 7, 7], "up_2": [32, 8, 8, 8]}, shapes
    x = load_data(cfg.data, cfg.seed).test.images
    raw, calibrated = Predictor(tmp_path / "run")(x)
    assert np.abs(raw - np.array(out["test_probs"])).max() < 1e-5
    assert main(["export", str(tmp_path / "run"), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    with torch.no_grad():
        got = torch.jit.load(str(tmp_path / "m.pt"))(x).numpy()
    assert np.abs(got - calibrated).max() < 1e-4
