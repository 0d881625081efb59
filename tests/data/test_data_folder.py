"""Image folders and CSV manifests: splits, splits.csv reuse, patient grouping, and every error."""

import csv
import os
import shutil
from pathlib import Path

import pytest
import torch

from dcube.config import DataConfig
from dcube.data import DataError, load_data, split_labels


def _cfg(path, **kw):
    kw.setdefault("image_size", 8)
    return DataConfig(source=kw.pop("source", "folder"), path=str(path), **kw)


def _by_class(split, bundle):
    return {c: int((split.labels == i).sum()) for i, c in enumerate(bundle.class_names)}


def test_folder_split_is_stratified_and_seeded(tmp_path, make_folder):
    root = make_folder(tmp_path / "imgs", {"b_cls": 70, "a_cls": 30})
    b = load_data(_cfg(root), seed=0)
    assert b.class_names == ["a_cls", "b_cls"]
    assert _by_class(b.train, b) == {"a_cls": 21, "b_cls": 49}
    assert _by_class(b.val, b) == {"a_cls": 3, "b_cls": 7}
    assert _by_class(b.test, b) == {"a_cls": 6, "b_cls": 14}
    assert b.train.images.shape == (70, 1, 8, 8) and b.train.labels.dtype == torch.int64
    ids = [set(s.ids) for s in (b.train, b.val, b.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert all(Path(i).is_file() for i in b.test.ids)
    for s in (b.train, b.val, b.test):  # labels follow the folder names
        assert all(Path(i).parent.name == b.class_names[y] for i, y in zip(s.ids, s.labels.tolist()))
    again = load_data(_cfg(root), seed=0)
    assert again.test.ids == b.test.ids and again.info["sha256"] == b.info["sha256"]
    assert load_data(_cfg(root), seed=1).test.ids != b.test.ids
    # data.split_seed pins the split (and caps) while the run's seed changes
    pinned = load_data(_cfg(root, split_seed=0, max_train=20), seed=5)
    assert pinned.test.ids == b.test.ids and pinned.train.ids == load_data(_cfg(root, max_train=20), seed=0).train.ids
    assert b.info["layout"] == "classes" and b.info["split_file"] is None


def test_splits_csv_saved_and_reused(tmp_path, make_folder, write_png):
    root = make_folder(tmp_path / "imgs", {"A": 20, "B": 20})
    run = tmp_path / "run"
    b = load_data(_cfg(root), seed=0, run_dir=run)
    file = run / "splits.csv"
    rows = list(csv.DictReader(file.open()))
    assert list(rows[0]) == ["path", "label", "split"] and len(rows) == 40
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert rows[0]["path"] == "A/A_000.png"  # relative to the folder root
    assert b.info["split_file"] == str(file) and not b.info["split_reused"]
    # a resumed run (even with another seed, or new files in the folder) keeps the saved split
    write_png(root / "A" / "A_new.png", 99)
    with pytest.warns(UserWarning, match="not in"):
        again = load_data(_cfg(root), seed=5, run_dir=run)
    assert again.info["split_reused"]
    for s in ("train", "val", "test"):
        assert again.split(s).ids == b.split(s).ids
    (root / "B" / "B_003.png").unlink()  # an image of the saved split is gone
    with pytest.raises(DataError, match="B_003.png"):
        load_data(_cfg(root), seed=0, run_dir=run)


def test_caps_on_folder(tmp_path, make_folder):
    root = make_folder(tmp_path / "imgs", {"A": 40, "B": 160})
    b = load_data(_cfg(root, max_train=20, max_val=5, max_test=10), seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (20, 5, 10)
    assert _by_class(b.train, b) == {"A": 4, "B": 16}
    assert b.info["split_sizes_before_caps"] == {"train": 140, "val": 20, "test": 40}


@pytest.mark.parametrize("kw", [{}, {"max_train": 12, "max_val": 4, "max_test": 6, "minority_ratio": 0.5}])
def test_split_labels_are_load_datas_without_reading_an_image(tmp_path, make_folder, monkeypatch, kw):
    root = make_folder(tmp_path / "imgs", {"A": 20, "B": 60})
    b = load_data(_cfg(root, **kw), seed=3)
    import dcube.data.dataset as dataset

    def no_reading(*a, **k):
        raise AssertionError("split_labels read an image")

    monkeypatch.setattr(dataset, "read_split", no_reading)
    for split in ("train", "val", "test"):
        got = split_labels(_cfg(root, **kw), seed=3, split=split)
        assert got.dtype.kind == "i" and got.tolist() == getattr(b, split).labels.tolist(), split


def test_predefined_folders(tmp_path, make_folder):
    root = tmp_path / "pre"
    make_folder(root / "train", {"x": 6, "y": 5})
    make_folder(root / "val", {"x": 2, "y": 2})
    make_folder(root / "test", {"x": 3, "y": 1})
    b = load_data(_cfg(root, channels=3), seed=0)
    assert b.info["layout"] == "predefined" and b.class_names == ["x", "y"]
    assert (len(b.train), len(b.val), len(b.test)) == (11, 4, 4)
    assert all("/val/" in i for i in b.val.ids) and b.val.images.shape == (4, 3, 8, 8)


def test_predefined_without_val_is_carved_from_train(tmp_path, make_folder):
    root = tmp_path / "pre"
    make_folder(root / "train", {"x": 20, "y": 20})
    make_folder(root / "test", {"x": 5, "y": 5})
    b = load_data(_cfg(root, val_fraction=0.1), seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (36, 4, 10)
    assert all("/train/" in i for i in b.val.ids)


def test_predefined_class_missing_from_train(tmp_path, make_folder):
    root = tmp_path / "pre"
    make_folder(root / "train", {"x": 3, "y": 3})
    make_folder(root / "val", {"x": 1, "y": 1})
    make_folder(root / "test", {"x": 1, "z": 1})
    with pytest.raises(DataError, match="unknown label 'z'.*test/z"):
        load_data(_cfg(root), seed=0)


def _manifest(path: Path, rows, header=("path", "label", "split", "patient_id")):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_grouped_by_patient(tmp_path, write_png):
    rows = []
    for p in range(40):
        label = "sick" if p % 4 == 0 else "well"
        for k in range(1 + p % 3):
            rel = f"img/p{p}_{k}.png"
            write_png(tmp_path / rel, 100 * p + k)
            rows.append((rel, label, f"P{p:02d}"))
    csv_path = _manifest(tmp_path / "m.csv", rows, ("path", "label", "patient_id"))
    b = load_data(_cfg(csv_path, source="csv"), seed=0, run_dir=tmp_path / "run")
    patient = {os.path.abspath(tmp_path / r[0]): r[2] for r in rows}
    seen = {s: {patient[i] for i in b.split(s).ids} for s in ("train", "val", "test")}
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"])
    assert sum(len(b.split(s)) for s in ("train", "val", "test")) == len(rows)
    assert all(len(b.split(s)) for s in ("train", "val", "test"))
    assert set(_by_class(b.val, b).values()) != {0} and b.info["layout"] == "csv"
    assert b.class_names == ["sick", "well"]
    assert (tmp_path / "run" / "splits.csv").is_file()
    again = load_data(_cfg(csv_path, source="csv"), seed=0)
    assert again.test.ids == b.test.ids


def test_csv_with_split_column_and_absolute_dicoms(tmp_path, shared_data):
    d = shared_data / "dicom"
    rows = [(d / "693_UNCR.dcm", "CT", "train"), (d / "MR_small.dcm", "MR", "train"),
            (d / "CT_small.dcm", "CT", "val"), (d / "emri_small.dcm", "MR", "test")]
    csv_path = _manifest(tmp_path / "m.csv", rows, ("path", "label", "split"))
    b = load_data(_cfg(csv_path, source="csv", image_size=16), seed=0)
    assert b.train.ids == [str(rows[0][0]), str(rows[1][0])] and b.test.ids == [str(rows[3][0])]
    assert b.train.labels.tolist() == [0, 1] and b.train.images.shape == (2, 1, 16, 16)
    assert torch.isfinite(b.train.images).all() and b.train.images.abs().max() <= 1


def test_csv_unknown_label(tmp_path, write_png):
    for i in range(4):
        write_png(tmp_path / f"{i}.png", i)
    rows = [("0.png", "a", "train"), ("1.png", "b", "train"), ("2.png", "a", "val"),
            ("3.png", "c", "test")]
    csv_path = _manifest(tmp_path / "m.csv", rows, ("path", "label", "split"))
    with pytest.raises(DataError, match=r"unknown label 'c'.*m\.csv:5"):
        load_data(_cfg(csv_path, source="csv"), seed=0)


def test_csv_patient_in_two_given_splits(tmp_path, write_png):
    for i in range(4):
        write_png(tmp_path / f"{i}.png", i)
    rows = [("0.png", "a", "train", "p1"), ("1.png", "b", "train", "p2"),
            ("2.png", "a", "val", "p3"), ("3.png", "b", "test", "p1")]
    with pytest.raises(DataError, match="patient 'p1'"):
        load_data(_cfg(_manifest(tmp_path / "m.csv", rows), source="csv"), seed=0)


def test_csv_missing_file_and_column(tmp_path, write_png):
    write_png(tmp_path / "0.png", 0)
    rows = [("0.png", "a"), ("missing.png", "b")]
    csv_path = _manifest(tmp_path / "m.csv", rows, ("path", "label"))
    with pytest.raises(DataError, match=r"missing\.png.*m\.csv:3"):
        load_data(_cfg(csv_path, source="csv"), seed=0)
    bad = _manifest(tmp_path / "n.csv", [("0.png",)], ("file",))
    with pytest.raises(DataError, match=r"n\.csv: missing column"):
        load_data(_cfg(bad, source="csv"), seed=0)


def test_corrupt_image_in_folder(tmp_path, make_folder):
    root = make_folder(tmp_path / "imgs", {"A": 5, "B": 5})
    (root / "B" / "B_002.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DataError, match="B_002.png"):
        load_data(_cfg(root), seed=0)


def test_empty_class_folder(tmp_path, make_folder):
    root = make_folder(tmp_path / "imgs", {"A": 5, "B": 5})
    (root / "C").mkdir()
    (root / "C" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="class folder .*C holds no image"):
        load_data(_cfg(root), seed=0)


def test_too_few_classes_empty_split_missing_path(tmp_path, make_folder):
    root = make_folder(tmp_path / "one", {"A": 10})
    with pytest.raises(DataError, match="at least 2"):
        load_data(_cfg(root), seed=0)
    root = make_folder(tmp_path / "tiny", {"A": 2, "B": 2})
    with pytest.raises(DataError, match="val split would be empty.*val_fraction"):
        load_data(_cfg(root), seed=0)
    with pytest.raises(DataError, match="does not exist"):
        load_data(_cfg(tmp_path / "nowhere"), seed=0)


def test_covid_folder_with_caps(shared_data):
    root = shared_data / "covid_radiography_128"
    b = load_data(_cfg(root, image_size=32, max_train=24, max_val=8, max_test=8), seed=0)
    assert b.class_names == ["COVID", "Normal"]
    sizes = b.info["split_sizes_before_caps"]  # 10 % / 20 % of the 3770 groups of copies (3800 images)
    assert sum(sizes.values()) == 3800 and abs(sizes["val"] - 380) <= 10 and abs(sizes["test"] - 760) <= 10
    # the folder holds 6 groups of byte-identical images (consecutive ids: one patient's series)
    assert b.info["grouping"]["duplicate_groups"] == 6 and b.info["grouping"]["duplicate_files"] >= 6
    assert b.train.images.shape == (24, 1, 32, 32) and set(b.train.labels.tolist()) == {0, 1}
    assert b.train.images.min() >= -1 and b.train.images.max() <= 1


def test_covid_copy_full_size(tmp_path, shared_data):
    src = shared_data / "covid_radiography_128"
    for cls in ("COVID", "Normal"):
        (tmp_path / cls).mkdir()
        for f in sorted((src / cls).iterdir())[:10]:
            shutil.copy(f, tmp_path / cls / f.name)
    b = load_data(_cfg(tmp_path, image_size=128, val_fraction=0.2), seed=0)
    assert b.train.images.shape == (12, 1, 128, 128)
    assert (len(b.val), len(b.test)) == (4, 4)


def test_csv_without_val_rows_carves_val_by_patient(tmp_path, write_png):
    rows = []
    for p in range(30):
        for k in range(2):
            write_png(tmp_path / f"p{p}_{k}.png", 10 * p + k)
            rows.append((f"p{p}_{k}.png", "ab"[p % 2], "test" if p < 6 else "train", f"P{p}"))
    b = load_data(_cfg(_manifest(tmp_path / "m.csv", rows), source="csv", val_fraction=0.25), seed=0)
    assert len(b.test) == 12 and len(b.val) > 0
    pid = {os.path.abspath(tmp_path / r[0]): r[3] for r in rows}
    val_p, train_p = {pid[i] for i in b.val.ids}, {pid[i] for i in b.train.ids}
    assert not val_p & train_p


def test_minority_ratio_cuts_only_the_smallest_training_class(tmp_path, make_folder):
    root = make_folder(tmp_path / "imgs", {"big": 70, "small": 30})
    full = load_data(_cfg(root), seed=0)
    cut = load_data(_cfg(root, minority_ratio=0.1), seed=0)
    assert _by_class(cut.train, cut) == {"big": 49, "small": 5}  # round(0.1 * 49)
    assert set(cut.train.ids) < set(full.train.ids) and cut.test.ids == full.test.ids
    assert cut.val.ids == full.val.ids
    with pytest.raises(DataError, match="data.minority_ratio"):
        load_data(_cfg(root, minority_ratio=1.5), seed=0)


def test_byte_identical_images_never_straddle_splits(shared_data, tmp_path, make_folder):
    """The COVID folder's duplicates (e.g. COVID-2807/2808/2809/2811) all land in one split, for every seed;
    without duplicates the split is the plain stratified one (unchanged)."""
    import hashlib

    from dcube.data.files import assign_splits
    from dcube.data.folder import scan_folder

    entries, _ = scan_folder(shared_data / "covid_radiography_128")
    digest = [hashlib.sha256(e.path.read_bytes()).hexdigest() for e in entries]
    groups: dict = {}
    for h, i in zip(digest, range(len(entries))):
        groups.setdefault(h, []).append(i)
    dups = [g for g in groups.values() if len(g) > 1]
    assert len(dups) == 6
    for seed in range(5):
        splits, info = assign_splits(entries, DataConfig(source="folder"), seed)
        assert all(len({splits[i] for i in g}) == 1 for g in dups), seed
        assert info["duplicate_groups"] == 6
    # no duplicates: identical to the stratified split of the labels
    from dcube.data.splits import stratified_split

    root = make_folder(tmp_path / "u", {"A": 30, "B": 12})
    entries, _ = scan_folder(root)
    splits, info = assign_splits(entries, DataConfig(source="folder"), 3)
    assert info["duplicate_groups"] == 0
    assert (splits == stratified_split([e.label for e in entries], 0.1, 0.2, 3)).all()


def test_group_pattern_keeps_a_patient_in_one_split(tmp_path):
    import numpy as np
    from PIL import Image

    from dcube.data.files import assign_splits
    from dcube.data.folder import scan_folder

    root = tmp_path / "k"
    for cls, n_pat in (("NORMAL", 12), ("PNEUMONIA", 12)):
        (root / cls).mkdir(parents=True)
        for p in range(n_pat):
            for k in range(3):
                img = np.full((8, 8), (p * 7 + k * 3 + (cls == "NORMAL") * 100) % 256, np.uint8)
                Image.fromarray(img).save(root / cls / f"person{p}{cls[0]}_{k}.png")
    entries, _ = scan_folder(root)
    # flat grey images a few levels apart: near copies by the thumbnail rule, so only byte-identical ones group here
    splits, info = assign_splits(entries, DataConfig(source="folder", group_pattern=r"person(\d+\w)_",
                                                     duplicates="exact"), 0)
    by_patient: dict = {}
    for e, s in zip(entries, splits):
        by_patient.setdefault(e.path.name.split("_")[0], set()).add(s)
    assert all(len(v) == 1 for v in by_patient.values()) and info["groups"] == 24
    assert set(splits) == {"train", "val", "test"}
    with pytest.raises(DataError, match="does not match 72 file name"):
        assign_splits(entries, DataConfig(source="folder", group_pattern=r"patient(\d+)"), 0)


def _smooth_png(path: Path, seed: int, size: int = 64) -> None:
    """A smooth random image (what a radiograph looks like at 16x16), which JPEG re-encodes closely."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize((size, size), Image.BICUBIC).save(path)


def test_a_re_encoded_copy_shares_its_twins_split(tmp_path):
    from PIL import Image

    for cls in ("A", "B"):
        for i in range(30):
            _smooth_png(tmp_path / cls / f"{cls}_{i:02d}.png", (0 if cls == "A" else 100) + i)
    for i in range(6):  # a lossy re-encoding (not byte-identical) and a plain byte copy
        Image.open(tmp_path / "A" / f"A_{i:02d}.png").save(tmp_path / "A" / f"copy_{i}.jpg", quality=80)
    shutil.copy(tmp_path / "B" / "B_00.png", tmp_path / "B" / "same.png")
    by_seed = {}
    for seed in range(4):  # a copy that could land anywhere lands elsewhere for some seed
        b = load_data(_cfg(tmp_path, image_size=16), seed=seed)
        where = {Path(i).name: s for s in ("train", "val", "test") for i in getattr(b, s).ids}
        assert all(where[f"copy_{i}.jpg"] == where[f"A_{i:02d}.png"] for i in range(6)), where
        assert where["same.png"] == where["B_00.png"]
        g = b.info["grouping"]
        assert g["near_duplicate_pairs"] == 6 and g["duplicate_groups"] == 1 and g["duplicates"] == "near"
        assert sorted(len(m) for m in g["near_duplicate_groups"]) == [2] * 6
        exact = load_data(_cfg(tmp_path, image_size=16, duplicates="exact"), seed=seed)
        by_seed[seed] = {Path(i).name: s for s in ("train", "val", "test") for i in getattr(exact, s).ids}
        assert "near_duplicate_pairs" not in exact.info["grouping"]
    assert any(w[f"copy_{i}.jpg"] != w[f"A_{i:02d}.png"] for w in by_seed.values() for i in range(6))
    off = load_data(_cfg(tmp_path, image_size=16, duplicates="off"), seed=0)
    assert off.info["grouping"]["duplicate_groups"] == 0
    _smooth_png(tmp_path / "A" / "copy_0.jpg", 999)  # no longer a copy: the thumbnails are read again
    assert load_data(_cfg(tmp_path, image_size=16), seed=0).info["grouping"]["near_duplicate_pairs"] == 5


def test_covid_folder_near_copies_land_with_their_twins(shared_data):
    """The COVID folder's re-encoded copies (not byte-identical): split apart when only byte-identical files
    are grouped (some into test, beside their training twin), one split each under data.duplicates: near."""
    from dcube.data.files import assign_splits
    from dcube.data.folder import Entry

    root = shared_data / "covid_radiography_128"
    entries = [Entry(path=p.resolve(), label=p.parent.name) for p in sorted(root.glob("*/*.png"))]
    near_splits, info = assign_splits(entries, _cfg(root, split_seed=0), 0)
    exact_splits, _ = assign_splits(entries, _cfg(root, split_seed=0, duplicates="exact"), 0)
    near = {str(e.path): s for e, s in zip(entries, near_splits)}
    exact = {str(e.path): s for e, s in zip(entries, exact_splits)}
    groups = info["near_duplicate_groups"]
    assert len(groups) >= 20 and all(len({near[p] for p in g}) == 1 for g in groups)
    apart = [g for g in groups if len({exact[p] for p in g}) > 1]
    assert sum("test" in {exact[p] for p in g} for g in apart) >= 7, apart
