"""Helpers for tests and examples: write tiny hand-made logs."""

import datetime as dt
import os
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from data.schema import TS_TYPE, PathLike, day_dir


def ts(text: str) -> int:
    """'2026-01-02 00:00:05' (UTC) -> microseconds since the epoch."""
    t = dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp()) * 1_000_000 + t.microsecond


def events_table(rows: Iterable[tuple], extra: Optional[dict] = None) -> pa.Table:
    """(user_id, item_id, 'YYYY-MM-DD HH:MM:SS') rows -> a table of the log schema."""
    rows = list(rows)
    cols = {
        "user_id": pa.array([r[0] for r in rows], pa.int64()),
        "item_id": pa.array([r[1] for r in rows], pa.int64()),
        "ts": pa.array([ts(r[2]) for r in rows], pa.int64()).cast(TS_TYPE),
    }
    cols.update(extra or {})
    return pa.table(cols)


def write_log(log_dir: PathLike, rows: Iterable[tuple], part: str = "part-00000.parquet") -> str:
    """Write events into day partitions by the date of their timestamp; returns log_dir."""
    by_day: dict = {}
    for r in rows:
        by_day.setdefault(r[2][:10], []).append(r)
    for day, day_rows in by_day.items():
        path = day_dir(log_dir, day)
        os.makedirs(path, exist_ok=True)
        pq.write_table(events_table(day_rows), os.path.join(path, part))
    return os.fspath(log_dir)
