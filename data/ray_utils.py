"""The one Ray bootstrap (trainer, data stages, tests), error unwrapping, and a counter actor that gathers
skipped-row counts from tasks on any node."""

import os
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NoReturn, Optional

import ray
from ray._private import ray_constants
from ray.data.context import ShuffleStrategy

from data.schema import LogError, SkipReport

# Progress of a data stage: (events read so far, events in its files by their footers).
EventsFn = Callable[[int, int], None]

# Above this many (read task x partition) objects, the pull-based sort shuffle's driver bookkeeping grows too
# large (about 16 GB at 1500 x 51 on the 10^8-event log, before reads were grouped; fine at 100 x 51).
MAX_SORT_SHUFFLE_OBJECTS = 20_000


def shuffle_strategy(read_tasks: int, partitions: int) -> ShuffleStrategy:
    """Sort-based shuffle while it is small (2-3x faster than the hash shuffles here, and no aggregator
    actors to start), hash shuffle beyond (aggregator actors: memory linear in tasks + partitions)."""
    if read_tasks * partitions <= MAX_SORT_SHUFFLE_OBJECTS:
        return ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return ShuffleStrategy.HASH_SHUFFLE


def ensure_ray(num_cpus: Optional[int] = None, *, runtime_env: Optional[dict[str, Any]] = None,
               log_to_driver: bool = True) -> None:
    """Use the Ray instance this process already has, else join the cluster RAY_ADDRESS names, else start
    a new local instance that listens on 127.0.0.1 only.

    A new local instance is always new (address="local"): never a cluster that some `ray start` left on this
    machine. It declares `num_cpus` logical CPUs (default: the machine's, at least 2), a 512 MB object store
    and no dashboard.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    common = dict(logging_level="ERROR", runtime_env=runtime_env, log_to_driver=log_to_driver)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**common)
        return
    loopback_only()
    ray.init(
        address="local",
        num_cpus=num_cpus or max(2, os.cpu_count() or 1),
        object_store_memory=512 * 1024**2,
        include_dashboard=False,
        **common,
    )


def loopback_only() -> None:
    """Make the next local Ray instance listen on 127.0.0.1 only (GCS, raylet, object manager, workers).

    ray.init(_node_ip_address="127.0.0.1") is not enough: Ray replaces a loopback node address by the
    machine's outward one unless its single-machine switch is set. Ray reads the switch when it is imported,
    so set it for the processes it starts (environment) and for this one (the constant).
    """
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
    """Skipped-row counts reported by read tasks (only files with bad rows call it), and the rows read so far
    (every file: the driver's progress display)."""

    def __init__(self) -> None:
        self.by_file: dict = {}
        self.rows = 0

    def add(self, path: str, counts: dict) -> None:
        self.by_file.setdefault(path, Counter()).update(counts)

    def read(self, rows: int) -> None:
        self.rows += rows

    def rows_read(self) -> int:
        return self.rows

    def get(self) -> dict:
        return self.by_file


@contextmanager
def polled(counter: "ray.actor.ActorHandle", total: int, on_events: Optional[EventsFn],
           every_s: float = 1.0) -> Iterator[None]:
    """While the block runs, `on_events(rows read, total)` about every `every_s` from a driver thread."""
    if on_events is None:
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every_s):
            on_events(int(ray.get(counter.rows_read.remote())), total)

    thread = threading.Thread(target=poll, name="data-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    on_events(int(ray.get(counter.rows_read.remote())), total)


def collect_skips(counter: "ray.actor.ActorHandle", rows_read: int) -> SkipReport:
    report = SkipReport(rows_read=rows_read)
    for path, counts in ray.get(counter.get.remote()).items():
        report.add(path, counts)
    return report
