"""Shared pytest fixtures."""

import os

import pytest
import ray

from data.ray_utils import ensure_ray

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance for the whole session (4 logical CPUs so Ray Data never starves)."""
    started = not ray.is_initialized()
    ensure_ray(num_cpus=4, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
