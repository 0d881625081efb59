"""Fixtures shared by every test package."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real test data: $DCUBE_SHARED_DATA, else <repo>/../shared/data.

    Skipped when absent, except in CI (env var CI set), where its absence fails the test.
    """
    env = os.environ.get("DCUBE_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        msg = f"shared test data not found at {path} (set DCUBE_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


# The slowest modules first (make test's --durations list). Each worker starts with a contiguous half of the
# collection and an idle one takes the end of the other's queue (--dist worksteal), so with the long tests in
# front the suite ends on short ones instead of one worker finishing a long test alone.
SLOW_FIRST = ("tests/pipeline/test_kill_anywhere.py", "tests/bench/test_smoke.py", "tests/pipeline/test_pipeline.py",
              "tests/distributed/test_distributed.py", "tests/predict/test_compare.py",
              "tests/pipeline/test_control_arms.py")


def pytest_collection_modifyitems(config, items):
    rank = {module: i for i, module in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
