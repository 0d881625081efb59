"""bench.size_curve's decision: drawn when every run is in (or when one complete dataset already rules every other
model out), and a model replaces the default only by the margin on every dataset."""

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
    text = " ".join(sc._decision(rows(on_one)))
    assert f"step-1 default: **{sc.DEFAULT}**" in text
    assert f"`uvit-small` {2 * sc.MARGIN:+.3f}, +0.000" in text  # the gain on each dataset, not only the smaller one
    on_both = {(d, "uvit-small"): 0.80 + 2 * sc.MARGIN for d in ds}
    assert "step-1 default: **uvit-small**" in " ".join(sc._decision(rows(on_both)))
    just_short = {(d, "uvit-small"): 0.80 + sc.MARGIN / 2 for d in ds}
    assert f"step-1 default: **{sc.DEFAULT}**" in " ".join(sc._decision(rows(just_short)))


def test_one_complete_dataset_without_a_winner_decides_before_the_others_are_in():
    ds = list(sc.BUDGET_MINUTES)
    partial = [r for r in rows({}) if r["dataset"] == ds[0]] + [r for r in rows({}) if r["dataset"] == ds[1]][:3]
    text = " ".join(sc._decision(partial))
    assert f"step-1 default: **{sc.DEFAULT}**" in text and "cannot change" in text
    assert f"{len(partial)} of the {2 * len(sc.MODELS) * len(sc.SEEDS)} runs are in" in text  # not shown as complete
    ahead = {(ds[0], "unet-small"): 0.80 + 2 * sc.MARGIN}  # it could still win if it wins on the other dataset too
    partial = [r for r in rows(ahead) if r["dataset"] == ds[0]] + [r for r in rows(ahead) if r["dataset"] == ds[1]][:3]
    assert "not yet" in " ".join(sc._decision(partial))


def test_the_step_spread_names_the_model_whose_seeds_got_the_most_different_budgets():
    ds = list(sc.BUDGET_MINUTES)
    rs = [{"dataset": ds[0], "model": "unet-tiny", "seed": s, "steps": n} for s, n in enumerate((100, 180, 120))]
    rs += [{"dataset": ds[1], "model": "unet-small", "seed": s, "steps": n} for s, n in enumerate((20, 21))]
    rs += [{"dataset": ds[1], "model": "unet-micro", "seed": 0, "steps": 5}]  # one seed: no spread
    assert sc._step_spread(rs) == (1.8, ds[0], "unet-tiny")
    assert sc._step_spread(rs[-1:]) is None
