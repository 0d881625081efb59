"""bench.size_curve's decision: drawn only when every run is in, and a model replaces the default only by the
margin on every dataset."""

import bench.size_curve as sc


def rows(val: dict, seeds=sc.SEEDS):
    return [{"dataset": ds, "model": m, "seed": s, "val_auc": val.get((ds, m), 0.80)}
            for ds in sc.BUDGET_MINUTES for m in sc.MODELS for s in seeds]


def test_no_decision_before_every_run_is_in():
    text = " ".join(sc._decision(rows({}, seeds=sc.SEEDS[:2])))
    assert "not yet" in text and f"{2 * len(sc.MODELS) * len(sc.BUDGET_MINUTES)} of the" in text


def test_another_model_replaces_the_default_only_by_the_margin_on_every_dataset():
    ds = list(sc.BUDGET_MINUTES)
    on_one = {(ds[0], "uvit-small"): 0.80 + 2 * sc.MARGIN}
    assert f"step-1 default: **{sc.DEFAULT}**" in " ".join(sc._decision(rows(on_one)))
    on_both = {(d, "uvit-small"): 0.80 + 2 * sc.MARGIN for d in ds}
    assert "step-1 default: **uvit-small**" in " ".join(sc._decision(rows(on_both)))
    just_short = {(d, "uvit-small"): 0.80 + sc.MARGIN / 2 for d in ds}
    assert f"step-1 default: **{sc.DEFAULT}**" in " ".join(sc._decision(rows(just_short)))
