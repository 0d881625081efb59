"""The hostile-input corpus (issue 14), generated at test time: every ordinary mistake is one line on
stderr naming the culprit, exit code 2, no traceback, and no metrics.json; most are caught before any
training. Each case builds a tiny valid folder dataset + config and breaks one thing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dcube.cli import main

SIZE = 16


def _png(path: Path, seed: int, size: int = SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(path)


def _folder(root: Path, counts=None) -> Path:
    for k, (cls, n) in enumerate(sorted((counts or {"A": 10, "B": 10}).items())):
        for i in range(n):
            _png(root / cls / f"{cls}_{i:03d}.png", 100 * k + i)
    return root


def _config(tmp: Path, data_path: Path | None = None, **sections) -> dict:
    cfg = {"run_dir": str(tmp / "run"), "seed": 0, "threads": 1,
           "data": {"source": "folder", "path": str(data_path or tmp / "data"), "image_size": SIZE,
                    "val_fraction": 0.2, "test_fraction": 0.2},
           "diffusion": {"preset": "micro", "max_steps": 1, "batch_size": 8, "sample_grid": False},
           "classifier": {"subfeature": "none", "epochs": 1, "batch_size": 8}}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def _write(tmp: Path, cfg: dict) -> Path:
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


# each case: (id, build(tmp) -> argv, text the one-line message must contain)
def _yaml_text(text: str | bytes):
    def build(tmp):
        _folder(tmp / "data")
        p = tmp / "cfg.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["run", str(p)]
    return build


def _cfg_case(**sections):
    def build(tmp):
        _folder(tmp / "data")
        return ["run", str(_write(tmp, _config(tmp, **sections)))]
    return build


def _data_case(make, **data):
    """make(tmp) -> data path (folder or CSV); the config points at it (+ `data` overrides)."""
    def build(tmp):
        path = make(tmp)
        cfg = _config(tmp, data_path=path)
        cfg["data"].update(source="csv" if str(path).endswith(".csv") else "folder", **data)
        return ["run", str(_write(tmp, cfg))]
    return build


def _corrupt(tmp, names=("A/A_003.png",), how=lambda p: p.write_bytes(b"not an image at all")):
    root = _folder(tmp / "data")
    for n in names:
        how(root / n)
    return root


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[:40])


def _csv(tmp, rows, header="path,label", encoding="utf-8"):
    root = _folder(tmp / "data")
    lines = [header] + [r for r in rows] + [f"{c}/{c}_{i:03d}.png,{c}" for c in "AB" for i in range(10)
                                             if header == "path,label"]
    p = root / "m.csv"
    p.write_bytes("\n".join(lines).encode(encoding))
    return p


def _nan_tiff(tmp):
    root = _folder(tmp / "data")
    x = np.zeros((SIZE, SIZE), np.float32)
    x[3, 3] = np.nan
    Image.fromarray(x, mode="F").save(root / "A" / "nan.tiff")
    return root


def _bad_name(tmp):
    root = _folder(tmp / "data")
    name = os.fsdecode(b"A_\xff\xfe.png")
    _png(root / "A" / name, 7)
    return root


def _layout(tmp, names):
    for s in names:
        _folder(tmp / "data" / s, {"A": 4, "B": 4})
    return tmp / "data"


def _run_dir_file(tmp):
    _folder(tmp / "data")
    (tmp / "run").write_text("I am a file")
    return ["run", str(_write(tmp, _config(tmp)))]


def _run_dir_under_file(tmp):
    _folder(tmp / "data")
    (tmp / "f").write_text("I am a file")
    return ["run", str(_write(tmp, _config(tmp, run_dir=str(tmp / "f" / "run"))))]


def _pickle_weights(tmp):
    _folder(tmp / "data")
    (tmp / "w.pt").write_bytes(b"\x80\x04fake pickle")
    return ["run", str(_write(tmp, _config(tmp, classifier={"subfeature": "resnet18",
                                                            "subfeature_weights": str(tmp / "w.pt")})))]


def _weights_case(write):
    """A sub-feature weights file named .safetensors whose content is wrong in the way `write(path)` makes it."""
    def build(tmp):
        _folder(tmp / "data")
        (tmp / "inputs").mkdir()
        write(tmp / "inputs" / "w.safetensors")
        return ["run", str(_write(tmp, _config(tmp, classifier={
            "subfeature": "resnet18", "subfeature_weights": str(tmp / "inputs" / "w.safetensors")})))]
    return build


def _torch_zip(path):
    import torch

    torch.save({"conv.weight": torch.zeros(2)}, path)


def _wrong_names(path):
    import torch
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(2, 2)}, str(path))


def _class_of_copies(tmp):
    """Class A: ten copies of one image (one group of copies): no split can give it val and test images."""
    root = _folder(tmp / "d")
    for i in range(1, 10):
        (root / "A" / f"A_{i:03d}.png").write_bytes((root / "A" / "A_000.png").read_bytes())
    return root


def _synthetic_not_a_set(tmp):
    _folder(tmp / "data")
    _folder(tmp / "other")
    return ["run", str(_write(tmp, _config(tmp, classifier={"synthetic_dir": str(tmp / "other")})))]


def _unlabelled_uint16(tmp):
    _folder(tmp / "data")
    np.savez(tmp / "u16.npz", images=np.zeros((10, SIZE, SIZE), np.uint16))
    return ["run", str(_write(tmp, _config(tmp, data={"unlabelled": str(tmp / "u16.npz")})))]


def _init_from_folder(tmp):
    _folder(tmp / "data")
    return ["run", str(_write(tmp, _config(tmp, diffusion={"init_from": str(tmp / "data")})))]


def _three_classes_target_sensitivity(tmp):
    _folder(tmp / "data", {"A": 10, "B": 10, "C": 10})
    return ["run", str(_write(tmp, _config(tmp, classifier={"target_sensitivity": 0.9})))]


def _set_not_yaml(tmp):
    _folder(tmp / "data")
    return ["run", str(_write(tmp, _config(tmp))), "--set", "classifier.epochs=[1"]


def _run_dir_in_data(sub):
    def build(tmp):
        _folder(tmp / "data")
        return ["run", str(_write(tmp, _config(tmp, run_dir=str(tmp / "data" / sub))))]
    return build


CASES = [
    # -- the config file
    ("config-missing", lambda tmp: ["run", str(tmp / "nope.yaml")], "nope.yaml"),
    ("yaml-list", _yaml_text("- data\n- diffusion\n"), "top level must be a mapping"),
    ("yaml-duplicate-key", _yaml_text("seed: 1\nseed: 2\n"), "'seed' is given twice"),
    ("yaml-syntax", _yaml_text("data: [unclosed\n"), "not valid YAML"),
    ("yaml-latin1", _yaml_text("run_dir: caf\xe9\n".encode("latin-1")), "not UTF-8"),
    ("unknown-key", _cfg_case(diffusion={"epochz": 3}), "diffusion.epochz"),
    ("wrong-type", _cfg_case(classifier={"epochs": "five"}), "classifier.epochs"),
    ("max-steps-negative", _cfg_case(diffusion={"max_steps": -5}), "diffusion.max_steps"),
    ("threads-zero", _cfg_case(threads=0), "threads"),
    ("checkpoint-every-zero", _cfg_case(diffusion={"checkpoint_every": 0}), "diffusion.checkpoint_every"),
    ("classifier-epochs-zero", _cfg_case(classifier={"epochs": 0}), "classifier.epochs"),
    ("diffusion-epochs-negative", _cfg_case(diffusion={"epochs": -1, "max_steps": None}), "diffusion.epochs"),
    ("fractions-over-one", _cfg_case(data={"val_fraction": 0.6, "test_fraction": 0.5}), "val_fraction + data.test_fraction"),
    ("fraction-out-of-range", _cfg_case(data={"test_fraction": 1.5}), "data.test_fraction"),
    ("unknown-preset", _cfg_case(diffusion={"preset": "gigantic"}), "diffusion.preset"),
    ("unknown-backbone", _cfg_case(diffusion={"backbone": "dit"}), "diffusion.backbone"),
    ("image-size-backbone", _cfg_case(data={"image_size": 18}), "image_size"),
    ("cuda-on-cpu", _cfg_case(device="cuda"), "device"),
    ("unknown-layer", _cfg_case(features={"layers": ["mid", "up_9"]}), "features.layers"),
    ("weights-missing", _cfg_case(classifier={"subfeature": "resnet18", "subfeature_weights": "/no/w.safetensors"}),
     "classifier.subfeature_weights"),
    ("weights-pickle", _pickle_weights, "pickle"),
    ("group-pattern-regex", _cfg_case(data={"group_pattern": "person(\\d+"}), "data.group_pattern"),
    ("bad-override", lambda tmp: ["run", "--set", "classifier.epochs"], "override"),
    ("unlabelled-missing", _cfg_case(data={"unlabelled": "/no/such/folder"}), "data.unlabelled"),
    ("synthetic-missing", _cfg_case(classifier={"synthetic_dir": "/no/such/set"}), "classifier.synthetic_dir"),
    ("classes-two-names", _cfg_case(data={"classes": ["A"]}), "data.classes"),
    # -- values no run can use (the second corpus, issue 34)
    ("lr-nan", _cfg_case(diffusion={"lr": float("nan")}), "diffusion.lr: must be a finite number"),
    ("lr-inf", _cfg_case(classifier={"lr": float("inf")}), "classifier.lr: must be a finite number"),
    ("lr-negative", _cfg_case(diffusion={"lr": -1e-4}), "diffusion.lr: must be > 0"),
    ("beta-end-too-big", _cfg_case(diffusion={"beta_end": 5.0}), "diffusion.beta_end"),
    ("top-level-int-key", _yaml_text("1: x\n"), "unknown config key '1'"),
    ("top-level-null-key", _yaml_text("~: x\n"), "unknown config key 'None'"),
    ("set-not-yaml", _set_not_yaml, "classifier.epochs=[1"),
    ("seed-negative", _cfg_case(seed=-1), "seed: must lie in"),
    ("seed-too-big", _cfg_case(seed=2 ** 40), "seed: must lie in"),
    ("threads-huge", _cfg_case(threads=100000), "threads: must lie in"),
    ("max-layers-zero", _cfg_case(features={"max_layers": 0}), "features.max_layers"),
    ("weight-decay-negative", _cfg_case(classifier={"weight_decay": -1}), "classifier.weight_decay"),
    ("timesteps-too-few", _cfg_case(diffusion={"num_train_timesteps": 1}), "diffusion.num_train_timesteps"),
    ("target-sensitivity-three-classes", _three_classes_target_sensitivity, "classifier.target_sensitivity"),
    ("cnn-only-without-cnn", _cfg_case(classifier={"diffusion_features": False}), "classifier.diffusion_features"),
    ("duplicates-unknown", _cfg_case(data={"duplicates": "fuzzy"}), "data.duplicates"),
    ("run-dir-is-data", _run_dir_in_data("."), "lies inside data.path"),
    # -- ranges and types of the remaining keys, one case per rule
    ("classifier-batch-zero", _cfg_case(classifier={"batch_size": 0}), "classifier.batch_size"),
    ("timestep-out-of-schedule", _cfg_case(features={"timestep": 1000}), "features.timestep"),
    ("removed-variant", _cfg_case(features={"timesteps": [10, 5000]}), "features.timesteps"),
    ("class-dropout-one", _cfg_case(diffusion={"class_dropout": 1.0}), "diffusion.class_dropout"),
    ("val-fraction-negative", _cfg_case(data={"val_fraction": -0.1}), "data.val_fraction"),
    ("ema-decay-one", _cfg_case(diffusion={"ema_decay": 1.0}), "diffusion.ema_decay"),
    ("removed-key-other-value", _cfg_case(features={"ks_alpha": 0.01}), "features.ks_alpha: removed in dcube 1.0"),
    ("grad-accum-zero", _cfg_case(compute={"grad_accum": 0}), "compute.grad_accum"),
    ("cnn-input-size-tiny", _cfg_case(classifier={"cnn_input_size": 8}), "classifier.cnn_input_size"),
    ("cnn-frozen-blocks-too-many", _cfg_case(classifier={"subfeature": "resnet18", "cnn_frozen_blocks": 9}),
     "classifier.cnn_frozen_blocks"),
    ("grid-sampler-unknown", _cfg_case(diffusion={"grid_samplers": ["euler"]}), "diffusion.grid_samplers"),
    ("select-rule-unknown", _cfg_case(features={"select": "magic"}), "features.select"),
    ("backbone-a-list", _cfg_case(diffusion={"backbone": ["unet"]}), "diffusion.backbone"),
    ("yes-for-an-integer", _yaml_text("classifier: {epochs: yes}\n"), "classifier.epochs"),
    ("seed-a-float", _cfg_case(seed=1.5), "seed"),
    ("threads-a-word", _cfg_case(threads="two"), "threads"),
    ("lr-a-word", _cfg_case(diffusion={"lr": "fast"}), "diffusion.lr"),
    ("min-steps-negative", _cfg_case(classifier={"min_steps": -1}), "classifier.min_steps"),
    ("ks-images-zero", _cfg_case(features={"ks_images": 0}), "features.ks_images"),
    ("max-train-zero", _cfg_case(data={"max_train": 0}), "data.max_train"),
    ("minority-ratio-over-one", _cfg_case(data={"minority_ratio": 1.5}), "data.minority_ratio"),
    ("labelled-per-class-zero", _cfg_case(data={"labelled_per_class": 0}), "data.labelled_per_class"),
    ("section-not-a-mapping", _yaml_text("diffusion: 5\n"), "diffusion"),
    ("init-from-missing", _cfg_case(diffusion={"init_from": "/no/backbone.safetensors"}), "diffusion.init_from"),
    # -- a fresh corpus, tried as a new user would: each of these was silently accepted, misreported, or late
    ("class-of-copies", _data_case(_class_of_copies), "class 'A' has no image in the val and test splits"),
    ("layers-empty-list", _cfg_case(features={"layers": []}), "features.layers: an empty list"),
    ("synthetic-dir-not-a-set", _synthetic_not_a_set, "is not a set of `dcube synthesize`"),
    ("init-from-a-folder", _init_from_folder, "diffusion.init_from: "),
    ("unlabelled-npz-uint16", _unlabelled_uint16, "has dtype uint16"),
    ("weights-torch-zip-named-safetensors", _weights_case(_torch_zip), "not a readable safetensors file"),
    ("weights-pickle-named-safetensors", _weights_case(lambda p: p.write_bytes(b"\x80\x04fake pickle")),
     "not a readable safetensors file"),
    ("weights-wrong-tensor-names", _weights_case(_wrong_names), "does not match this network"),
    ("run-dir-inside-data", _run_dir_in_data("A/run"), "lies inside data.path"),
    # -- the run directory
    ("run-dir-is-file", _run_dir_file, "is a file"),
    ("run-dir-under-file", _run_dir_under_file, "is a file"),
    ("run-dir-not-writable", _cfg_case(run_dir="/proc/1/dcube-run"), "run_dir"),
    # -- the data
    ("folder-missing", _cfg_case(data={"path": "/no/such/data"}), "/no/such/data"),
    ("folder-no-classes", _data_case(lambda tmp: (tmp / "empty").mkdir() or tmp / "empty"), "no class folders"),
    ("one-class", _data_case(lambda tmp: _folder(tmp / "d", {"A": 10})), "at least 2"),
    ("empty-class-folder", _data_case(lambda tmp: (_folder(tmp / "d") / "C").mkdir() or tmp / "d"), "C holds no image"),
    ("corrupt-png", _data_case(lambda tmp: _corrupt(tmp)), "A_003.png"),
    ("truncated-png", _data_case(lambda tmp: _corrupt(tmp, how=_truncate)), "A_003.png"),
    ("nan-pixels", _data_case(_nan_tiff), "nan.tiff"),
    ("file-name-not-utf8", _data_case(_bad_name), "not valid UTF-8"),
    ("typo-class", _data_case(lambda tmp: _folder(tmp / "d", {"A": 10, "B": 10, "Bb": 1})), "'Bb' has only 1"),
    ("case-twins", _data_case(lambda tmp: _folder(tmp / "d", {"A": 6, "a ": 6, "B": 10})), "differ only in case"),
    ("classes-mismatch", _cfg_case(data={"classes": ["A", "C"]}), "'B'"),
    ("unknown-split-layout", _data_case(lambda tmp: _layout(tmp, ["SetOne", "SetTwo"])), "split names are not known"),
    ("too-few-train-per-class", _data_case(lambda tmp: _folder(tmp / "d", {"A": 3, "B": 3}), val_fraction=0.34,
                                           test_fraction=0.34), "keeps 1 training image"),
    ("csv-latin1", _data_case(lambda tmp: _csv(tmp, ["A/A_000.png,caf\xe9"], encoding="latin-1")), "not UTF-8"),
    ("csv-missing-column", _data_case(lambda tmp: _csv(tmp, ["A/A_000.png"], header="file")), "missing column"),
    ("csv-outside-root", _data_case(lambda tmp: _csv(tmp, ["../../etc/passwd,A"])), "leads outside"),
    ("csv-listed-twice", _data_case(lambda tmp: _csv(tmp, ["A/A_000.png,A"])), "listed twice"),
    ("csv-file-absent", _data_case(lambda tmp: _csv(tmp, ["A/ghost.png,A"])), "ghost.png"),
    ("csv-empty-label", _data_case(lambda tmp: _csv(tmp, ["A/A_000.png,"], header="path,label,x")), "empty 'label'"),
    ("csv-bad-split", _data_case(lambda tmp: _csv(tmp, ["A/A_000.png,A,holdout"], header="path,label,split")),
     "holdout"),
]


@pytest.mark.parametrize("build,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_hostile_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, build, needle):
    argv = build(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.rglob("metrics.json"))
    made = [p for p in tmp_path.rglob("*.safetensors") if "inputs" not in p.relative_to(tmp_path).parts]
    assert not made, "nothing may train before the check"


def test_every_bad_file_in_one_message_and_a_rerun_after_removing_them_works(tmp_path, capsys):
    """Four corrupt files: one message names all four, splits.csv is not written; deleting them is enough."""
    bad = ["A/A_001.png", "A/A_004.png", "B/B_002.png", "B/B_007.png"]
    root = _corrupt(tmp_path, bad)
    cfg = _write(tmp_path, _config(tmp_path, data_path=root, diffusion={"max_steps": 1, "preset": "micro", "batch_size": 8,
                                                                    "sample_grid": False}))
    assert main(["train-diffusion", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "4 image files cannot be used" in err and all(Path(b).name in err for b in bad), err
    assert not (tmp_path / "run" / "splits.csv").exists()
    for b in bad:
        (root / b).unlink()
    assert main(["train-diffusion", str(cfg)]) == 0
    assert (tmp_path / "run" / "splits.csv").exists() and (tmp_path / "run/diffusion/ema.safetensors").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished micro run (about 10 s), shared by the tests that re-run it."""
    tmp = tmp_path_factory.mktemp("finished")
    _folder(tmp / "data")
    cfg = _config(tmp)
    assert main(["run", str(_write(tmp, cfg))]) == 0
    return tmp, cfg


@pytest.mark.parametrize("change,needle", [({"classifier": {"lr": 0.5}}, "classifier.lr differs"),
                                           ({"seed": 3}, "seed 3 differs")])
def test_a_finished_run_rerun_with_another_value_is_one_line(finished, capsys, change, needle):
    tmp, cfg = finished
    cfg = {**cfg, **{k: {**cfg[k], **v} if isinstance(v, dict) else v for k, v in change.items()}}
    p = tmp / "changed.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_a_second_process_on_a_live_run_dir_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    _folder(tmp_path / "data")
    cfg = _write(tmp_path, _config(tmp_path))
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dcube.utils.lock import lock_run_dir; "
                               f"lock_run_dir({str(tmp_path / 'run')!r}); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["run", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "in use" in err, err
        assert not (tmp_path / "run" / "config.yaml").exists()  # nothing rewritten under the owner
    finally:
        holder.kill()
        holder.wait()
    # the owner died (SIGKILL): its lock went with it
    assert main(["select-layers", str(cfg)]) in (0, 2)  # select needs step 1: a clear error, or done
    assert (tmp_path / "run" / "config.yaml").exists()


def test_ctrl_c_is_one_line_with_the_resume_command(tmp_path, capsys, monkeypatch):
    from dcube import pipeline

    _folder(tmp_path / "data")
    cfg = _write(tmp_path, _config(tmp_path))

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.DCube, "train_diffusion", interrupted)
    assert main(["run", str(cfg), "--set", "seed=0"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"dcube: interrupted; every finished step and checkpoint is kept. Resume with: "
                                f"dcube run {cfg} --set seed=0"]


def test_a_bug_is_one_line_and_a_log_file_with_the_traceback(tmp_path, capsys, monkeypatch):
    from dcube import pipeline

    _folder(tmp_path / "data")
    cfg = _write(tmp_path, _config(tmp_path))

    def broken(self):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline.DCube, "train_diffusion", broken)
    assert main(["run", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "ZeroDivisionError" in err
    logs = list((tmp_path / "run" / "logs").glob("dcube-error-*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text() and "broken" in logs[0].read_text()
    assert str(logs[0]) in err


def test_training_testing_folders_are_splits_and_rgba_transparency_is_named(tmp_path):
    """Training/ and Testing/ (the brain-tumour MRI layout) are the train and test splits, not two classes;
    an RGBA image with a transparent background is composited onto black, with a warning naming it."""
    from dcube.config import DataConfig
    from dcube.data import load_data
    from dcube.data import images as images_mod

    root = _layout(tmp_path, ["Training", "Testing"])
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., :3] = 255  # white where transparent: a plain convert("RGB") would keep it
    rgba[4:12, 4:12, 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "Training" / "A" / "rgba.png")
    images_mod._alpha_warned.clear()
    with pytest.warns(UserWarning, match="rgba.png: has transparent pixels"):
        b = load_data(DataConfig(source="folder", path=str(root), image_size=SIZE, val_fraction=0.2), seed=0)
    assert b.class_names == ["A", "B"] and b.info["layout"] == "predefined"
    assert len(b.test) == 8
    split = b.train if any(p.endswith("rgba.png") for p in b.train.ids) else b.val
    x = split.images[next(k for k, p in enumerate(split.ids) if p.endswith("rgba.png")), 0]
    assert float(x[0, 0]) == -1.0 and float(x[8, 8]) > 0.99  # transparent -> black, opaque white stays


def test_cli_manners(capsys):
    from dcube import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"dcube {__version__}"
    assert main(["config", "--set", "classifier.epochs=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["classifier"]["epochs"] == 7 and printed["diffusion"]["preset"] == "tiny"
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "(default: 64)" in capsys.readouterr().out


def test_class_names_never_steer_file_paths_and_are_drawn_literally(tmp_path):
    """A label `../../x` cannot write outside the run; a label with `$` (mathtext) plots without error."""
    from dcube.evaluate import compute_metrics
    from dcube.evaluate.plots import plot_confusion, plot_roc
    from dcube.utils.io import safe_name

    for name in ("../../x", "/etc/passwd", "a/b\\c", "..", "", "$5 copay$", "tumour (grade ≥ 2)"):
        out = safe_name(name, "class")
        assert out and "/" not in out and "\\" not in out and not out.startswith(".")
        assert (tmp_path / out).resolve().parent == tmp_path.resolve()
    names = ["$^$ (a bad mathtext)", "../../x"]
    y = np.array([0, 1, 0, 1, 1, 0])
    p = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9], [0.55, 0.45], [0.9, 0.1]])
    plot_confusion(compute_metrics(y, p, names), tmp_path / "c.png")
    plot_roc(y, p, names, tmp_path / "r.png")
    assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "r.png").stat().st_size > 0


def test_a_users_config_yaml_in_run_dir_is_never_overwritten(tmp_path, capsys):
    """run_dir: . with the user's commented config saved as ./config.yaml: refused, the file untouched; a
    config.yaml that dcube wrote itself (a resumed run) is fine."""
    _folder(tmp_path / "data")
    run = tmp_path / "proj"
    run.mkdir()
    mine = run / "config.yaml"
    text = "# my notes, keep them\n" + yaml.safe_dump(_config(tmp_path, run_dir=str(run)))
    mine.write_text(text)
    assert main(["run", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "was not written by dcube" in err and str(mine) in err, err
    assert mine.read_text() == text
    other = tmp_path / "mine.yaml"
    other.write_text(text)
    mine.unlink()
    assert main(["select-layers", str(other)]) == 2  # no step 1 yet: a clear error, but config.yaml is written
    capsys.readouterr()
    assert (run / "config.yaml").read_text().startswith("# dcube: the resolved configuration")
    assert main(["select-layers", str(other)]) == 2 and "was not written" not in capsys.readouterr().err


def test_images_without_an_extension_are_read_by_content_and_other_files_are_named(tmp_path, shared_data):
    """A PNG saved without an extension and a DICOM named IM0001 (the usual DICOM naming) are images; a text
    file beside them is named in a warning as skipped."""
    import shutil

    from dcube.config import DataConfig
    from dcube.data import load_data

    root = _folder(tmp_path / "data")
    (root / "A" / "A_000.png").rename(root / "A" / "scan0")
    shutil.copy(shared_data / "dicom" / "CT_small.dcm", root / "B" / "IM0001")
    (root / "B" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="1 file\\(s\\) that are not images are skipped, e.g. notes.txt"):
        b = load_data(DataConfig(source="folder", path=str(root), image_size=SIZE, val_fraction=0.2,
                                 test_fraction=0.2), seed=0)
    ids = [Path(i).name for s in (b.train, b.val, b.test) for i in s.ids]
    assert "scan0" in ids and "IM0001" in ids and len(ids) == 21


def test_a_folder_mixing_split_and_class_folders_is_refused(tmp_path, capsys):
    root = tmp_path / "data"
    _folder(root / "train")
    _folder(root / "Extra", {"X": 3})
    (root / "Extra" / "loose.png").write_bytes((root / "train" / "A" / "A_000.png").read_bytes())
    assert main(["run", str(_write(tmp_path, _config(tmp_path)))]) == 2
    err = capsys.readouterr().err
    assert "mixes split folders (train) with other folders (Extra)" in err and len(err.strip().splitlines()) == 1, err


def test_a_run_directory_edited_by_hand_is_refused_naming_the_file(tmp_path, capsys):
    """config.yaml, splits.csv and the model files carry fingerprints: run, predict, report and export refuse a run
    whose files were changed after dcube wrote them, naming the file; restoring the file makes it work again."""
    _folder(tmp_path / "data")
    cfg_path = _write(tmp_path, _config(tmp_path))
    assert main(["run", str(cfg_path)]) == 0
    run = tmp_path / "run"
    capsys.readouterr()
    image = tmp_path / "data" / "A" / "A_000.png"
    for name, change in (("config.yaml", lambda t: t.replace("epochs: 1", "epochs: 7", 1)),
                         ("splits.csv", lambda t: t.replace(",test\n", ",train\n", 1))):
        f = run / name
        original = f.read_text()
        f.write_text(change(original))
        assert f.read_text() != original
        for argv in (["run", str(cfg_path)], ["predict", str(run), str(image), "--out", str(tmp_path / "p")]):
            if name == "splits.csv" and argv[0] == "predict":
                continue  # predict does not read the split
            assert main(argv) == 2, (name, argv)
            err = capsys.readouterr().err
            assert str(f) in err and "edited after dcube wrote it" in err and len(err.strip().splitlines()) == 1, err
        f.write_text(original)
    best = run / "classifier" / "best.safetensors"
    original = best.read_bytes()
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(best))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(best))
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert str(best) in err and "changed after the run was evaluated" in err, err
    best.write_bytes(original)
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "p")]) == 0
    assert main(["run", str(cfg_path)]) == 0


def test_a_bug_is_still_one_line_when_no_log_can_be_written(tmp_path, capsys, monkeypatch):
    import tempfile

    from dcube import pipeline

    _folder(tmp_path / "data")
    cfg = _write(tmp_path, _config(tmp_path))

    def no_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def broken(self):  # the disk fills up, then a bug: the error handler cannot write its log anywhere
        monkeypatch.setattr(Path, "write_text", no_disk)
        monkeypatch.setattr(tempfile, "mkstemp", no_disk)
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline.DCube, "train_diffusion", broken)
    assert main(["run", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "ZeroDivisionError" in err and "no log file" in err and "No space left" in err, err


def test_the_report_names_a_folder_run_by_its_data_not_a_medmnist_default(tmp_path):
    _folder(tmp_path / "data")
    assert main(["run", str(_write(tmp_path, _config(tmp_path)))]) == 0
    import json

    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["dataset"] == "data"
    assert "dataset data," in (tmp_path / "run" / "report.html").read_text()
