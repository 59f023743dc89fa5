"""Small Ray helpers shared by the data stages: a local instance when none is running, error unwrapping,
and a counter actor that gathers skipped-row counts from tasks on any node."""

import os
from collections import Counter
from typing import NoReturn, Optional

import ray

from data.schema import LogError, SkipReport


def ensure_ray(num_cpus: Optional[int] = None) -> None:
    """Attach to the running Ray instance, or start a small local one (a cluster driver calls ray.init itself)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(
        num_cpus=num_cpus or max(2, os.cpu_count() or 1),
        object_store_memory=1024**3,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )


def loopback_only() -> None:
    """Make the next local Ray instance listen on 127.0.0.1 only (GCS, raylet, object manager, workers).

    ray.init(_node_ip_address="127.0.0.1") is not enough: Ray replaces a loopback node address by the
    machine's outward one unless its single-machine switch is set. Ray reads the switch when it is imported,
    so set it for the processes it starts (environment) and for this one (the constant).
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def reraise(e: BaseException) -> NoReturn:
    """Re-raise the LogError inside a Ray wrapper as a plain LogError (readable message), else `e`."""
    seen = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, LogError):
            raise LogError(cur.path, cur.problem) from e
        cause = getattr(cur, "cause", None)  # RayTaskError keeps the user exception here
        cur = cause if isinstance(cause, BaseException) else (cur.__cause__ or cur.__context__)
    raise e


@ray.remote(num_cpus=0)
class SkipCounter:
    """Skipped-row counts reported by read tasks (only files with bad rows call it)."""

    def __init__(self) -> None:
        self.by_file: dict = {}

    def add(self, path: str, counts: dict) -> None:
        self.by_file.setdefault(path, Counter()).update(counts)

    def get(self) -> dict:
        return self.by_file


def collect_skips(counter: "ray.actor.ActorHandle", rows_read: int) -> SkipReport:
    report = SkipReport(rows_read=rows_read)
    for path, counts in ray.get(counter.get.remote()).items():
        report.add(path, counts)
    return report
