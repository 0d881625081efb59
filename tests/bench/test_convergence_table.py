"""bench.convergence: a schedule other than a dataset's standard one is named, tabled and compared on its own."""

from pathlib import Path

import bench.convergence as conv


def _row(variant, seed, epochs, val, test):
    return {"dataset": "pneumoniamnist", "variant": variant, "seed": seed, "epochs": epochs, "val_auc": val,
            "test_auc": test, "chosen_step": 74 * epochs, "train_minutes": epochs, "curve": []}


def test_run_name_carries_a_non_standard_length_only():
    assert conv.run_name("pneumoniamnist", "normalized", 0, 10) == "pneumoniamnist-normalized-s0"
    assert conv.run_name("pneumoniamnist", "normalized", 1, 100) == "pneumoniamnist-e100-normalized-s1"
    assert conv.run_name("pneumoniamnist", "untrained", 0, 100) == "pneumoniamnist-untrained-s0"
    assert conv.eval_epochs("pneumoniamnist", 10) == 1 and conv.eval_epochs("pneumoniamnist", 100) == 5


def test_long_schedule_gets_its_own_table_and_a_validation_comparison(monkeypatch, tmp_path):
    rows = [_row("normalized", s, 10, 0.90 + s / 100, 0.5) for s in range(2)]
    rows += [_row("normalized", s, 100, 0.95 + s / 50, 0.9) for s in range(2)]
    monkeypatch.setattr(conv, "load_results", lambda study: rows if study == conv.STUDY else [])
    monkeypatch.setattr(conv, "plot", lambda rs, ds, epochs=None: conv.RESULTS / conv.STUDY / f"p{epochs}.png")
    monkeypatch.setattr(conv, "grid_path", lambda name: tmp_path / f"samples-{name}.png")  # none drawn
    md = conv.table()
    standard, long = md.split("### pneumoniamnist, 100 epochs")
    assert "| 2 | 10 |" in standard and "| 100 |" not in standard  # the long runs stay out of the main table
    assert "| 2 | 100 | 0.960 ± 0.014 | 7400 ± 0 | 0.900 ± 0.000 |" in long
    assert "100 epochs − 10 epochs (`normalized`, validation AUC of the chosen checkpoints): +0.055 (per seed +0.050, +0.060; p = " in long
    assert "In progress: 2 of 3 seeds" in long and "In progress" not in standard
    assert Path(md.splitlines()[-1].split("(")[-1].rstrip(")")).name == "p100.png"
