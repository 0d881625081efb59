import csv

import pytest
import torch

from dcube.cli import main as dcube_main
from dcube.data import DataBundle, Split
from dcube.generate import (SYNTHETIC_PREFIX, SyntheticSet, assert_real, augment_train, balance_counts,
                            load_synthetic, per_class_counts, synthesize)
from dcube.generate.synthetic import train_fingerprint

from .conftest import toy_images, write_folder


def test_balance_counts():
    assert balance_counts([147, 399]) == [252, 0]
    assert balance_counts([147, 399], 0.5) == [53, 0]  # up to ceil(199.5) = 200
    assert balance_counts([5, 9, 2]) == [4, 0, 7]
    assert per_class_counts(3, 4) == [4, 4, 4]
    with pytest.raises(ValueError, match="ratio"):
        balance_counts([1, 2], 0)


def _bundle(counts=(10, 6)):
    x, y = toy_images(list(counts))
    split = Split(x, y, [f"img{i}" for i in range(len(y))])
    v = Split(x[:4], y[:4], ["v0", "v1", "v2", "v3"])
    return DataBundle(split, v, Split(x[4:8], y[4:8], ["t0", "t1", "t2", "t3"]), ["a", "b"])


def test_synthesize_writes_pngs_and_a_manifest_deterministically(checkpoint, tmp_path):
    data = _bundle()
    fp = train_fingerprint(data.train)
    s = synthesize(checkpoint, [2, 3], tmp_path / "a", data.class_names, fp, steps=3, guidance=1.0, seed=7,
                   progress=False)
    assert s.counts() == [2, 3] and s.images.shape == (5, 1, 8, 8)
    assert sorted(p.name for p in (tmp_path / "a" / "b").glob("*.png")) == [f"b_0000{i}.png" for i in range(3)]
    rows = list(csv.DictReader(open(tmp_path / "a" / "manifest.csv")))
    assert len(rows) == 5 and {r["sampler"] for r in rows} == {"ddim"} and {r["steps"] for r in rows} == {"3"}
    assert {r["guidance"] for r in rows} == {"1.0"} and {r["seed"] for r in rows} == {"7"}
    assert len(rows[0]["checkpoint_sha256"]) == 64 and rows[0]["train_sha256"] == fp
    again = synthesize(checkpoint, [2, 3], tmp_path / "b", data.class_names, fp, steps=3, guidance=1.0, seed=7,
                       progress=False)
    assert torch.equal(s.images, again.images)
    assert (tmp_path / "a/a/a_00001.png").read_bytes() == (tmp_path / "b/a/a_00001.png").read_bytes()
    with pytest.raises(FileExistsError):
        synthesize(checkpoint, [1, 1], tmp_path / "a", data.class_names, fp, steps=3, progress=False)
    # a user's image folder is never written into, even with overwrite
    user = tmp_path / "mine" / "a"
    user.mkdir(parents=True)
    (user / "scan.png").write_bytes((tmp_path / "a/a/a_00001.png").read_bytes())
    with pytest.raises(FileExistsError, match="not a synthetic set"):
        synthesize(checkpoint, [1, 1], tmp_path / "mine", data.class_names, fp, steps=3, progress=False, overwrite=True)
    assert [p.name for p in (tmp_path / "mine").rglob("*") if p.is_file()] == ["scan.png"]


def test_synthetic_images_only_enter_the_training_split(checkpoint, tmp_path):
    data = _bundle()
    s = synthesize(checkpoint, [0, 4], tmp_path, data.class_names, train_fingerprint(data.train), steps=2,
                   progress=False)
    train = augment_train(data, s)
    assert len(train) == 20 and train.labels[16:].tolist() == [1] * 4
    assert all(i.startswith(SYNTHETIC_PREFIX) for i in train.ids[16:])
    assert len(augment_train(data, s, ratio=0.125)) == 18  # at most 0.125 * 16 synthetic images
    assert len(data.train) == 16  # the bundle is untouched
    with pytest.raises(ValueError, match="val split holds 4 synthetic"):
        assert_real(Split(s.images, s.labels, s.ids), "val")
    other = _bundle((9, 7))  # a generator trained on another training split is refused
    with pytest.raises(ValueError, match="different training split"):
        augment_train(other, s)
    with pytest.raises(ValueError, match="must start with"):
        SyntheticSet(s.images, s.labels, ["x"] * 4, s.class_names, s.info)


def test_trainer_refuses_a_val_or_test_split_holding_synthetic_images(checkpoint, tmp_path):
    from dcube.classify.baseline import BaselineConfig, train_baseline

    data = _bundle()
    synthesize(checkpoint, [1, 1], tmp_path, data.class_names, train_fingerprint(data.train), steps=2,
               progress=False)
    s = load_synthetic(tmp_path)
    poisoned = DataBundle(data.train, Split(torch.cat([data.val.images, s.images]),
                                            torch.cat([data.val.labels, s.labels]), data.val.ids + s.ids),
                          data.test, data.class_names)
    with pytest.raises(ValueError, match="val split holds 2 synthetic"):
        train_baseline(BaselineConfig(epochs=1), poisoned, tmp_path / "b", lambda y, p: 0.0)


def test_cli_balance_tops_every_class_up_to_the_largest(checkpoint, tmp_path):
    root = write_folder(tmp_path / "imgs", [12, 5])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\n"
                   f"data: {{source: folder, path: {root}, image_size: 8, val_fraction: 0.2, test_fraction: 0.2}}\n")
    (tmp_path / "run" / "diffusion").mkdir(parents=True)
    (tmp_path / "run" / "diffusion" / "ema.safetensors").write_bytes(checkpoint.read_bytes())
    assert dcube_main(["synthesize", str(cfg), "--balance", "--steps", "2"]) == 0
    from dcube.config import load_config
    from dcube.data import load_data

    train = load_data(load_config(cfg).data, 0, tmp_path / "run").train
    counts = train.labels.bincount().tolist()
    s = load_synthetic(tmp_path / "run" / "synthetic")
    assert s.counts() == [max(counts) - c for c in counts] and s.counts()[1] > 0
    assert (tmp_path / "run" / "real_vs_generated.png").stat().st_size > 0
    # the set is accepted for this run's training split
    assert len(augment_train(load_data(load_config(cfg).data, 0, tmp_path / "run"), s)) == 2 * max(counts)
    assert dcube_main(["synthesize", str(cfg), "--balance", "--steps", "2"]) == 2  # exists already
    assert dcube_main(["synthesize", str(cfg), "--per-class", "1", "--guidance", "-1", "--overwrite"]) == 2
