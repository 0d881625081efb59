"""`dcube compare`: two arms on the same test images, paired; runs on other test images refused."""

import json

import pytest

from dcube.cli import main


def _run(shared_data, tmp_path, name, seed, max_test=32, **classifier):
    import yaml

    cfg = {"run_dir": str(tmp_path / name), "seed": seed, "threads": 1,
           "data": {"name": "pneumoniamnist", "download": False, "split_seed": 0,
                    "path": str(shared_data / "medmnist" / "pneumoniamnist.npz"),
                    "max_train": 96, "max_val": 32, "max_test": max_test},
           "diffusion": {"preset": "micro", "max_steps": 2, "batch_size": 32, "sample_grid": False},
           "classifier": {"subfeature": "none", "epochs": 1, "batch_size": 32, **classifier}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(p)]) == 0
    return tmp_path / name


@pytest.fixture(scope="module")
def arms(shared_data, tmp_path_factory):
    """Two arms of two seeds each on the same test images (module-wide: about 20 s)."""
    tmp = tmp_path_factory.mktemp("arms")
    return tmp, [_run(shared_data, tmp, f"a{s}", s) for s in (0, 1)], \
        [_run(shared_data, tmp, f"b{s}", s, lr=1e-2) for s in (0, 1)]


def test_compare_pairs_two_arms_and_refuses_other_test_images(shared_data, arms, tmp_path, capsys):
    _, a, b = arms
    capsys.readouterr()
    assert main(["compare", *map(str, a), "--against", *map(str, b)]) == 0
    out = capsys.readouterr().out
    assert "A minus B" in out and "p = " in out and "32 test images" in out, out
    import dcube

    r = dcube.compare_runs(a, b, "accuracy")
    ma, mb = (json.loads((x / "metrics.json").read_text())["test"]["accuracy"] for x in (a[0], b[0]))
    assert r["paired_seeds"] and r["seeds_a"] == 2 and -1 <= r["diff"] <= 1 and r["ci"][0] <= r["diff"] <= r["ci"][1]
    assert dcube.compare_runs(a[:1], b[:1], "accuracy")["diff"] == pytest.approx(ma - mb)
    other = _run(shared_data, tmp_path, "other", 0, max_test=40)
    capsys.readouterr()
    assert main(["compare", str(a[0]), "--against", str(other)]) == 2
    err = capsys.readouterr().err
    assert "other" in err and "not those of" in err and len(err.strip().splitlines()) == 1, err


def test_train_baseline_writes_the_record_compare_pairs_with_a_dcube_run(arms, tmp_path, capsys):
    root, (a, _), _ = arms
    assert main(["train-baseline", str(root / "a0.yaml"), "--model", "resnet18", "--epochs", "1",
                 "--out", str(tmp_path / "resnet")]) == 0
    m = json.loads((tmp_path / "resnet" / "metrics.json").read_text())
    assert "auc" in m["test"]["ci95"] and len(m["test_probs"]) == len(m["test_ids"]) == 32
    capsys.readouterr()
    assert main(["compare", str(a), "--against", str(tmp_path / "resnet")]) == 0
    assert "A minus B" in capsys.readouterr().out
