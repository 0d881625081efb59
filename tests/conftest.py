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
