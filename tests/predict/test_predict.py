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
        "features": {"ks_images": 64, "batch_size": 64},
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
    rc = main(["predict", str(d / "run"), str(shared_data / "dicom"), "--out", str(d / "dcm")])
    out = json.loads((d / "dcm" / "predictions.json").read_text())
    assert rc == 0 and len(out["predictions"]) == len(list((shared_data / "dicom").glob("*.dcm")))
    for r in out["predictions"]:
        assert abs(sum(r[f"prob_{n}"] for n in out["class_names"]) - 1) < 1e-6


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
