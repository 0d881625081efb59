"""Shared benchmark plumbing: one JSON per run (skip finished runs), tables regenerated
from those JSON files into one page per study (docs/benchmarks/<study>.md) and its entry in the BENCHMARKS.md
index (between `<!-- study:begin -->` markers)."""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

from dcube.utils.io import atomic_write_text, write_json
from dcube.utils.runtime import package_versions

ROOT = Path(__file__).resolve().parents[1]
# DCUBE_BENCH_OUT redirects results and the tables (smoke tests); DCUBE_BENCH_SMOKE=1 shrinks every run
_OUT = os.environ.get("DCUBE_BENCH_OUT")
RESULTS = Path(_OUT) / "results" if _OUT else ROOT / "bench" / "results"
BENCHMARKS = Path(_OUT) / "BENCHMARKS.md" if _OUT else ROOT / "BENCHMARKS.md"  # the index: question -> answer, link
PAGES = Path(_OUT) / "docs" / "benchmarks" if _OUT else ROOT / "docs" / "benchmarks"  # one page per study
SMOKE = os.environ.get("DCUBE_BENCH_SMOKE") == "1"
THREADS = int(os.environ.get("DCUBE_BENCH_THREADS", "1"))  # 1: other jobs share this 2-core machine
# DCUBE_BENCH_RUNS: where studies that support it keep their run directories (checkpoints that must outlive a
# work tree: long runs resume from there in a later sitting); default results/<study>/runs
_RUNS = os.environ.get("DCUBE_BENCH_RUNS")


# what every table's CIs and paired cells are (paired_cell, ci_cell), in the words its prose uses
STATS = ("two-level bootstrap (the test images within class, then the seeds; t with Satterthwaite df); \"beats\" / "
         "\"below\" only at Holm-adjusted p < 0.05 with at least 3 seeds per trained arm, the paired comparisons "
         "under one heading one family")


def runs_root(study: str) -> Path:
    return Path(_RUNS) / study if _RUNS and not _OUT else RESULTS / study / "runs"
_TINY = {
    "data": {"max_train": 48, "max_val": 24, "max_test": 24},
    "diffusion": {"preset": "micro", "epochs": 1, "max_steps": 2, "batch_size": 16, "sample_grid": False,
                  "checkpoint_every": 100},
    "classifier": {"epochs": 1, "batch_size": 16},
    "latent": {"ae_channels": [8, 8], "ae_epochs": 1},
}


def shrink(cfg: dict) -> dict:
    """`cfg` (a RunConfig dict) with tiny data caps and schedules when SMOKE, else unchanged."""
    if not SMOKE:
        return cfg
    out = dict(cfg)
    for section, tiny in _TINY.items():
        out[section] = {**out.get(section, {}), **tiny}
    return out


def smoke_epochs(epochs: int | None) -> int | None:
    return 1 if SMOKE and epochs else epochs


# the "long" step-2 / baseline schedule: at least this many optimiser steps (classifier.min_steps)
LONG_STEPS = 2 if SMOKE else 400


def shared_data() -> Path:
    """The real data: $DCUBE_SHARED_DATA, else <repo>/../shared/data."""
    return Path(os.environ.get("DCUBE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} (no GPU)"


def reset_peak_rss() -> None:
    """Restart this process's peak-RSS count (Linux: VmHWM); a no-op where /proc does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak RSS of this process since the last `reset_peak_rss` (else since it started), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # never reset: an upper bound


def run_once(study: str, key: str, fn: Callable[[], dict]) -> dict:
    """Run `fn` unless `results/<study>/<key>.json` exists; store its result with metadata.

    `peak_rss_mb` is this run's own peak (the count restarts per run, so a later run in the same
    process does not inherit an earlier one's), unless `fn` measured it itself (a child process).
    Once the JSON is stored, the feature cache of the run directory `runs_root(study) / key` (where the
    studies that keep their runs there put them; gigabytes on the COVID folder) is deleted: the pipeline
    rebuilds it when needed, and a finished run is never run again.
    """
    path = RESULTS / study / f"{key}.json"
    if path.exists():
        print(f"[bench] {study}/{key}: done already")
        return json.loads(path.read_text())
    reset_peak_rss()
    t0 = time.time()
    out = fn()
    out.setdefault("peak_rss_mb", peak_rss_mb())
    out.update(key=key, wall_s=round(time.time() - t0, 1), versions=package_versions(),
               machine=machine(), date=dt.date.today().isoformat())
    write_json(path, out)
    shutil.rmtree(runs_root(study) / key / "features", ignore_errors=True)
    return out


def run_study(study: str, jobs: Iterable[tuple[str, Callable[[], dict]]], table: Callable[[], str],
              table_only: bool = False, budget_s: float | None = None) -> int:
    """Every study's main loop: run each `(key, fn)` once (`run_once`), refresh the study's section of
    BENCHMARKS.md after each, then print the table. `jobs` may be a generator: with `table_only` it is
    never started, so set-up inside it (loading data) is skipped too. With `budget_s`, no run starts once
    that many seconds have passed since the call (a run in progress finishes): a sitting's end."""
    if not table_only:
        t0 = time.monotonic()
        for key, fn in jobs:
            spent = budget_s is not None and time.monotonic() - t0 > budget_s
            if spent and not (RESULTS / study / f"{key}.json").exists():
                print(f"[{study}] budget of {budget_s:.0f} s spent; {key} and later runs are left for the next call")
                break
            run_once(study, key, fn)
            write_section(study, render(study, table))
    md = render(study, table)
    write_section(study, md)
    print(md)
    return 0


_FAMILY: list = []  # the family of the section being rendered (render): paired_cell adds to it


def add_budget_arg(parser, default: float | None = None) -> None:
    """`--budget-s`, the argument of run_study's budget_s (every long study takes it)."""
    parser.add_argument("--budget-s", type=float, default=default,
                        help="start no new run after this many seconds (a run in progress finishes)")


def render(study: str, table: Callable[[], str]) -> str:
    """`table()` with every `paired_cell` in it one family: Holm-adjusted together (Family), named below it."""
    fam = Family(f"the paired comparisons under each heading of this section ({study})")
    _FAMILY.append(fam)
    try:
        md = table()
    finally:
        _FAMILY.remove(fam)
    md = fam.fill(md, by_heading=True)
    if not fam.results:
        return md
    if "**Answer" not in md:  # the index shows it; a study that writes its own answer keeps it
        from dcube.evaluate.stats import result_verdict

        up = sum(result_verdict(r, r["p_holm"]) == "beats" for r in fam.results)
        down = sum(result_verdict(r, r["p_holm"]) == "below" for r in fam.results)
        md += (f"\n\n**Answer.** Of the {len(fam.results)} paired comparisons on this page (each table names the "
               f"difference it pairs), {up} are above 0 and {down} below 0 at Holm-adjusted p < 0.05 (within each "
               f"heading) with at least 3 seeds; the other {len(fam.results) - up - down} are not distinguishable.")
    return md + "\n\n" + fam.note()


def load_results(study: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((RESULTS / study).glob("*.json"))]


def mean_std(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


INDEX = "<!-- index -->"  # ends a page's plot line that the BENCHMARKS.md index shows too


def write_section(study: str, markdown: str) -> None:
    """Write the study's page (docs/benchmarks/<study>.md) and its entry in the BENCHMARKS.md index: the page's
    title, its "**Answer.**" / "**In progress**" lines (when the table writes them), the plots it marks with
    INDEX (a headline figure) and the link."""
    page = markdown.replace("](bench/", "](../../bench/").replace("](docs/", "](../").replace("](BENCHMARKS.md", "](../../BENCHMARKS.md")
    PAGES.mkdir(parents=True, exist_ok=True)
    atomic_write_text(PAGES / f"{study}.md", f"[Benchmarks index](../../BENCHMARKS.md)\n\n{page.rstrip()}\n")
    title = next((line[3:].strip() for line in markdown.splitlines() if line.startswith("## ")), study)
    answers = [line.strip() for line in markdown.splitlines()
               if line.strip().startswith(("**Answer", "**In progress")) or line.rstrip().endswith(INDEX)]
    entry = "\n\n".join([f"### [{title}](docs/benchmarks/{study}.md)", *answers])
    begin, end = f"<!-- {study}:begin -->", f"<!-- {study}:end -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else (
        "# Benchmarks\n\nOne page per study under `docs/benchmarks/`, each regenerated from the JSON files in "
        "`bench/results/` by the command shown on it; nothing is typed by hand. Model selection uses the validation "
        "split only; results are mean ± std over seeds.\n")
    block = f"{begin}\n{entry}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(BENCHMARKS, text)


def _data_config(r: dict) -> dict | None:
    return r.get("data_config") or (r.get("config") or {}).get("data")


def has_probs(runs: list[dict]) -> bool:
    return bool(runs) and all("test_probs" in r and _data_config(r) for r in runs)


def _paired_labels(runs: list[dict]):
    """The common test labels of `runs` (their stored data config and seed), or None when their test
    splits differ (e.g. seeded caps) or a run lacks its per-image probabilities."""
    import numpy as np

    if not has_probs(runs):
        return None
    ys = [test_labels(_data_config(r), r["seed"]) for r in runs]
    if any(len(y) != len(ys[0]) or not np.array_equal(y, ys[0]) for y in ys):
        return None
    return ys[0]




def paired_cell(runs: list[dict], ref: list[dict], metric: str = "auc") -> str:
    """Seed-mean difference runs - ref on the same test images: its 95 % CI, raw and Holm-adjusted p and the
    verdict from the adjusted p (two-level bootstrap). Inside `render` the family is the section's; alone, it
    is a family of one."""
    fam = _FAMILY[-1] if _FAMILY else Family("this comparison alone")
    cell = fam.cell(runs, ref, metric)
    return cell if _FAMILY else fam.fill(cell)


def paired_test(runs: list[dict], ref: list[dict], metric: str = "auc") -> dict | None:
    """The two-level bootstrap of runs - ref on their common test images (None without them); raw p."""
    return two_level_test(runs, ref, metric)


@functools.lru_cache(maxsize=16)
def _labels(data_json: str, seed: int, split: str):
    import dataclasses

    from dcube.config import DataConfig
    from dcube.config import with_legacy_values
    from dcube.data import split_labels as labels_of

    known = {f.name for f in dataclasses.fields(DataConfig)}
    # a record from another version: keys it lacks take their behaviour of before they existed (e.g. the split
    # of a folder grouped byte-identical files only), other unknown keys are dropped
    values = {k: v for k, v in with_legacy_values({"data": json.loads(data_json)})["data"].items() if k in known}
    return labels_of(DataConfig(**values), seed, split)


def split_labels(data_cfg: dict, seed: int, split: str = "test"):
    """The labels of one split, in split order, of a run made with this data config and seed."""
    return _labels(json.dumps(data_cfg, sort_keys=True), seed, split)


def test_labels(data_cfg: dict, seed: int):
    return split_labels(data_cfg, seed, "test")


def _by_seed(runs: list[dict]) -> list[dict]:
    return sorted(runs, key=lambda r: r["seed"])


def two_level_test(runs: list[dict], ref: list[dict] | None = None, metric: str = "auc") -> dict | None:
    """`dcube.evaluate.stats.two_level_bootstrap` of runs (minus ref) on their common test images; the runs
    of one seed in both arms are paired when both arms have the same seeds. None without per-image probabilities."""
    import numpy as np

    from dcube.evaluate.stats import two_level_bootstrap

    if not runs or (ref is not None and not ref):  # an arm without runs (yet): nothing to compare
        return None
    y = _paired_labels(runs + (ref or []))
    if y is None:
        return None
    a = [np.array(r["test_probs"]) for r in _by_seed(runs)]
    b = None if ref is None else [np.array(r["test_probs"]) for r in _by_seed(ref)]
    paired = ref is not None and [r["seed"] for r in _by_seed(runs)] == [r["seed"] for r in _by_seed(ref)]
    return two_level_bootstrap(y, a, b, metric, paired=paired)


def thread_hours(r: dict) -> float:
    """Thread-hours a run took: its seconds times the torch threads it ran with (`threads` in its record or its
    config; 1 where neither says, as for every run stored before the field). Its seconds: the sum of its
    pipeline stages over every session it ran in (a resumed run included); for a baseline, its training epochs
    over every session or the wall time of its last call, whichever is longer. A stage it read from another run
    (a shared step-1 model) is not counted."""
    stages = {k: v for k, v in (r.get("stage_seconds") or {}).items() if k != "total_this_call"}
    seconds = sum(stages.values()) if stages else max(r.get("wall_s", 0.0), r.get("train_seconds") or 0.0)
    return seconds * (r.get("threads") or (r.get("config") or {}).get("threads") or 1) / 3600


def ci_cell(runs: list[dict], metric: str = "auc") -> str:
    """'[low, high]': 95 % CI of the seed-mean test metric (two-level bootstrap: test images, then seeds)."""
    r = two_level_test(runs, None, metric)
    return "-" if r is None else f"[{max(r['ci'][0], 0.0):.3f}, {min(r['ci'][1], 1.0):.3f}]"  # a metric in [0, 1]


class Family:
    """One table's family of comparisons: each `cell` holds a place until every p-value of the family is
    known; `fill` writes them with Holm's adjustment (dcube.evaluate.stats.holm) beside the raw p, and the
    verdict ("beats" / "below") only from the adjusted one."""

    def __init__(self, name: str):
        self.name, self.results = name, []

    def cell(self, runs: list[dict], ref: list[dict], metric: str = "auc") -> str:
        r = two_level_test(runs, ref, metric)
        if r is None:
            return "-"
        self.results.append(r)
        return f"@@{id(self)}:{len(self.results) - 1}@@"

    def fill(self, text: str, by_heading: bool = False) -> str:
        """Write every cell; with `by_heading`, the cells under each Markdown heading (a table and the lines after
        it) are Holm-adjusted as their own family, else all of them together."""
        import re

        from dcube.evaluate.stats import format_p, holm, result_verdict

        heads = [m.start() for m in re.finditer(r"^#{2,4} ", text, flags=re.M)] if by_heading else []
        where = {}
        for i in range(len(self.results)):
            at = text.find(f"@@{id(self)}:{i}@@")
            where[i] = sum(h <= at for h in heads)
        adj = [0.0] * len(self.results)
        for part in set(where.values()):
            members = [i for i in where if where[i] == part]
            for i, q in zip(members, holm([self.results[i]["p"] for i in members])):
                adj[i] = q
        for i, (r, q) in enumerate(zip(self.results, adj)):
            r["p_holm"] = q
            text = text.replace(f"@@{id(self)}:{i}@@", f"{r['diff']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}], "
                                f"{format_p(r['p'])}, {format_p(q, 'Holm p')}: {result_verdict(r, q)}")
        return text

    def note(self) -> str:
        return (f"Family \"{self.name}\": {len(self.results)} comparison(s) in all, Holm-adjusted per family; "
                "two-level bootstrap (test images stratified by class, then seeds, paired by seed), t with "
                "Satterthwaite df.")
