"""bench.common.run_once and run_study: one JSON per run, skipped when present, each run's own peak memory, its feature
cache deleted, no new run once a budget is spent."""

import os
from pathlib import Path

import pytest
import torch

import bench.common as common


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    return tmp_path


def test_run_once_writes_once_and_skips_finished_runs(results):
    calls = []
    first = common.run_once("s", "k", lambda: calls.append(1) or {"x": 1})
    again = common.run_once("s", "k", lambda: calls.append(1) or {"x": 2})
    assert calls == [1] and first["x"] == again["x"] == 1 and (results / "s" / "k.json").exists()


def test_run_once_deletes_the_finished_runs_feature_cache_and_keeps_the_rest(results, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(common, "_OUT", "")
    run_dir = tmp_path / "runs" / "s" / "k"

    def job():
        for sub in ("features", "diffusion"):
            (run_dir / sub).mkdir(parents=True)
            (run_dir / sub / "x.safetensors").write_bytes(b"0")
        assert (run_dir / "features").exists()  # the cache is there while the run needs it
        return {"x": 1}

    common.run_once("s", "k", job)
    assert not (run_dir / "features").exists() and (run_dir / "diffusion" / "x.safetensors").exists()


def test_run_once_keeps_a_peak_measured_by_the_run_itself(results):
    assert common.run_once("s", "child", lambda: {"peak_rss_mb": 1.5})["peak_rss_mb"] == 1.5


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="a per-run peak needs Linux /proc/self/clear_refs")
def test_a_later_run_does_not_inherit_an_earlier_runs_peak(results):
    def big():
        x = torch.ones(64 * 2**20)  # 256 MiB
        return {"s": float(x[0])}

    heavy = common.run_once("s", "heavy", big)["peak_rss_mb"]
    light = common.run_once("s", "light", dict)["peak_rss_mb"]
    assert heavy - light > 200


def test_run_study_runs_each_job_once_and_table_only_runs_none(results, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(common, "PAGES", tmp_path / "pages")
    started = []

    def jobs():
        started.append(True)  # set-up a --table-only call must not do
        for key in ("a", "b"):
            yield key, lambda key=key: {"v": key}

    table = lambda: ("## S\n\n**Answer.** " + " | ".join(r["v"] for r in common.load_results("s")) + "\n\n| x |\n\n"  # noqa: E731
                     f"![headline](bench/results/s/h.png) {common.INDEX}\n\n![detail](bench/results/s/d.png)")
    assert common.run_study("s", jobs(), table, table_only=True) == 0 and not started
    common.run_study("s", jobs(), table)
    common.run_study("s", jobs(), table)  # resumed: nothing reruns
    assert sorted(p.name for p in (results / "s").glob("*.json")) == ["a.json", "b.json"]
    page, index = (tmp_path / "pages" / "s.md").read_text(), (tmp_path / "BENCHMARKS.md").read_text()
    assert "**Answer.** a | b" in page and "| x |" in page  # the study's page: the whole table
    assert "### [S](docs/benchmarks/s.md)" in index and "**Answer.** a | b" in index and "| x |" not in index
    assert "![headline](bench/results/s/h.png)" in index and "detail" not in index  # only the marked plot
    assert "![headline](../../bench/results/s/h.png)" in page and "![detail](../../bench/results/s/d.png)" in page


def _baseline_on(monkeypatch, train_seconds: float, threads: int = 1) -> dict:
    """run_baseline's record of a ResNet-18 whose training loop (stubbed) reports train_seconds."""
    from types import SimpleNamespace

    import dcube.classify.baseline as baseline
    import dcube.utils.runtime as runtime
    from bench.baselines import run_baseline

    class Split(SimpleNamespace):
        def __len__(self):
            return len(self.labels)

    split = Split(labels=torch.tensor([0, 1, 0, 1]), images=torch.zeros(4, 1, 8, 8))
    data = SimpleNamespace(class_names=["a", "b"], train=split, val=split, test=split)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    monkeypatch.setattr(baseline, "train_baseline", lambda *a, **k: {
        "best_epoch": 1, "history": [], "val_probs": probs, "test_probs": probs, "train_seconds": train_seconds})
    monkeypatch.setattr(runtime, "configure_torch", lambda threads=None: None)  # keep this test worker's one thread
    return run_baseline("resnet18", data, Path("unused"), 0, epochs=1, threads=threads)


def test_a_resumed_baselines_cost_counts_every_session(monkeypatch):
    """run_baseline reports the training loop's seconds over all sessions, not the last call's wall time, and
    thread_hours counts them."""
    from bench.common import thread_hours

    out = _baseline_on(monkeypatch, 5000.0)  # a run resumed after 5,000 s of epochs
    assert out["train_seconds"] == 5000.0
    assert thread_hours({**out, "wall_s": 60.0}) == pytest.approx(5000 / 3600)
    assert thread_hours({"wall_s": 60.0}) == pytest.approx(60 / 3600)  # a record without it: its wall time


def test_a_runs_cost_counts_the_threads_it_ran_with(monkeypatch):
    """A run on two torch threads costs twice its seconds in thread-hours: run_baseline records the threads it
    was given, and thread_hours reads them from the record or from a D-Cube run's config."""
    from bench.common import thread_hours

    out = _baseline_on(monkeypatch, 1800.0, threads=2)
    assert out["threads"] == 2
    assert thread_hours({**out, "wall_s": 10.0}) == pytest.approx(1.0)
    dcube = {"stage_seconds": {"diffusion": 900.0, "classifier": 900.0, "total_this_call": 1800.0}}
    assert thread_hours({**dcube, "config": {"threads": 2}}) == pytest.approx(1.0)
    assert thread_hours(dcube) == pytest.approx(0.5)  # a record that names no threads: one


def test_run_study_starts_no_run_once_its_budget_is_spent(results, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(common, "PAGES", tmp_path / "pages")
    clock = iter([0.0, 5.0, 11.0, 12.0, 13.0])  # the call's start, then one reading before each job
    monkeypatch.setattr(common.time, "monotonic", lambda: next(clock))
    (results / "s").mkdir()
    (results / "s" / "c.json").write_text('{"v": "c"}')  # finished earlier: read back, not a new run
    ran = []
    jobs = ((k, lambda k=k: ran.append(k) or {"v": k}) for k in ("a", "c", "b", "d"))
    common.run_study("s", jobs, lambda: "## S\n", budget_s=10)
    assert ran == ["a"]  # c is read back at 11 s; b would start at 12 s > 10 s, so neither it nor d starts
    assert sorted(p.name for p in (results / "s").glob("*.json")) == ["a.json", "c.json"]
