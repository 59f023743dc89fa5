"""Shared pytest fixtures."""

import os

import pytest
import ray

from data.ray_utils import ensure_ray
from tests.helpers import run_distributed, start_forkserver

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Keep the session's idle Ray workers (Ray kills them after 1 s idle by default): each new one spends seconds
# importing pyarrow, numpy and this project before a Ray Data test's first task can run.
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "3600000")


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance for the whole session (4 logical CPUs so Ray Data never starves)."""
    started = not ray.is_initialized()
    ensure_ray(num_cpus=4, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def pytest_collection_modifyitems(session, config, items):
    """Tests that run process groups share one forkserver: start it in the background once they are collected."""
    if any(getattr(getattr(item, "module", None), "run_distributed", None) is run_distributed for item in items):
        start_forkserver()
