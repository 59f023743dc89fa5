"""Shared pytest fixtures."""

import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance for the whole session (4 logical CPUs so Ray Data never starves)."""
    import ray

    from data.ray_utils import loopback_only

    started = not ray.is_initialized()
    if started:
        loopback_only()
        ray.init(
            num_cpus=4,
            object_store_memory=512 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
    yield ray
    if started:
        ray.shutdown()
