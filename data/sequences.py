"""Events -> one row per user (user_id, item_ids list, ts list) in time order, written as Parquet shards.

Two back ends with the same output rows (tests/test_data_sequences.py checks it):
  ray    distributed: read tasks validate files and hash users into buckets, Ray Data groups by bucket,
         each bucket is sorted and cut into lists in one vectorised call (not one Python call per user).
  arrow  single process, holds the selected events in memory: for small logs and tests.

Order within a user (the tie rule): by ts, then by item_id. It depends only on the events, not on how
the log is laid out in files, so both back ends and any re-partitioning of the log agree.
"""

import datetime as dt
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from data.ray_utils import EventsFn, SkipCounter, collect_skips, ensure_ray, polled, reraise, shuffle_strategy
from data.schema import (
    ITEM,
    LOG_SCHEMA,
    TS,
    TS_TYPE,
    USER,
    DayLike,
    IdMapper,
    LogError,
    LogFile,
    PathLike,
    SkipReport,
    count_rows,
    iter_file,
    list_files,
)

SEQ_SCHEMA = pa.schema([(USER, pa.int64()), ("item_ids", pa.list_(pa.int64())), (TS, pa.list_(TS_TYPE))])
Backend = Literal["ray", "arrow"]


@dataclass
class SequenceStats:
    out_dir: str
    num_users: int
    num_events: int
    skipped: SkipReport = field(default_factory=SkipReport)


_TIE_RULE = [(USER, "ascending"), (TS, "ascending"), (ITEM, "ascending")]


def events_to_sequences(table: pa.Table) -> pa.Table:
    """Rows of (user_id, item_id, ts), any order -> one row per user, sorted by user_id (SEQ_SCHEMA)."""
    if table.num_rows == 0:
        return SEQ_SCHEMA.empty_table()
    table = table.select([USER, ITEM, TS]).sort_by(_TIE_RULE)  # arrow's multi-key sort: ~10x np.lexsort
    user = table.column(USER).to_numpy()
    first = np.concatenate([[0], np.flatnonzero(np.diff(user)) + 1])  # (U,) first event of each user
    offsets = np.concatenate([first, [len(user)]])  # (U+1,)
    return pa.table(
        {
            USER: pa.array(user[first]),
            "item_ids": make_list(offsets, table.column(ITEM).to_numpy()),
            TS: make_list(offsets, table.column(TS).cast(pa.int64()).to_numpy(), TS_TYPE),
        },
        schema=SEQ_SCHEMA,
    )


def build_sequences(
    log_dir: PathLike,
    out_dir: PathLike,
    cutoff_day: Optional[DayLike] = None,
    backend: Backend = "ray",
    *,
    start_day: Optional[DayLike] = None,
    max_bad_fraction: float = 0.001,
    rows_per_bucket: int = 2_000_000,
    overwrite: bool = False,
    ids: Optional[IdMapper] = None,
    on_events: Optional[EventsFn] = None,
    ts_unit: str = "timestamp",
) -> SequenceStats:
    """Sequences of the events on days in [start_day, cutoff_day) (None: unbounded), written to `out_dir`.

    `cutoff_day` is exclusive: cutoff_day=D keeps the days before D. `ids`: the vocabulary's map from raw to
    dense ids (data/vocab.py), applied as the log is read; None for a log of dense integer ids. `on_events`:
    called with (events read, events in the files) as the read goes on, on the calling thread or a thread
    of its process. `ts_unit`: how an integer `ts` column is read (data.ts_unit, data.schema.check_schema).
    """
    out_dir = os.fspath(out_dir)
    prepare_out(out_dir, overwrite)
    files = list_files(log_dir, start_day, cutoff_day)
    if not files:
        raise LogError(log_dir, f"no day partitions in [{start_day or 'start'}, {cutoff_day or 'end'})")
    if backend == "arrow":
        return _build_arrow(files, out_dir, max_bad_fraction, rows_per_bucket, ids, on_events, ts_unit)
    if backend == "ray":
        return _build_ray(files, out_dir, max_bad_fraction, rows_per_bucket, ids, on_events, ts_unit)
    raise ValueError(f"backend must be 'ray' or 'arrow', got {backend!r}")


def prepare_out(out_dir: str, overwrite: bool) -> str:
    """An empty `out_dir`; a non-empty one is replaced only when `overwrite`."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise ValueError(f"{out_dir} is not empty; pass overwrite=True to replace it")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    return out_dir


def _build_arrow(files: list[LogFile], out_dir: str, max_bad_fraction: float, rows_per_shard: int,
                 ids: Optional[IdMapper], on_events: Optional[EventsFn], ts_unit: str) -> SequenceStats:
    report = SkipReport()
    total = count_rows(files, ts_unit=ts_unit) if on_events is not None else 0
    parts = []
    for f in files:
        parts += [t.select([USER, ITEM, TS])
                  for t in iter_file(f, max_bad_fraction=max_bad_fraction, report=report, columns=[], ids=ids,
                                     ts_unit=ts_unit)]
        if on_events is not None:
            on_events(report.rows_read, total)
    events = pa.concat_tables(parts).combine_chunks() if parts else LOG_SCHEMA.empty_table()
    seqs = events_to_sequences(events)
    # Shards of about rows_per_shard events, cut between users.
    lengths = np.diff(list_parts(seqs.column("item_ids"))[0])  # (U,) events per user
    cuts = np.searchsorted(np.cumsum(lengths), np.arange(rows_per_shard, lengths.sum(), rows_per_shard), "right")
    bounds = [0, *sorted(set(int(c) for c in cuts) - {0, len(lengths)}), len(lengths)] if len(lengths) else [0]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(seqs.slice(a, b - a), os.path.join(out_dir, f"part-{i:05d}.parquet"))
    report.warn()
    return SequenceStats(out_dir, seqs.num_rows, events.num_rows, report)


# ---------------------------------------------------------------- Ray Data back end


def _bucket_of(user: np.ndarray, num_buckets: int) -> np.ndarray:
    """A user's bucket: a multiplicative hash, so consecutive ids spread evenly."""
    h = user.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((h >> np.uint64(33)) % np.uint64(num_buckets)).astype(np.int64)


def _read_files(batch: dict, num_buckets: int, max_bad_fraction: float, counter,
                ids: Optional[IdMapper], ts_unit: str = "timestamp") -> Iterator[pa.Table]:
    """Ray map task: validate and stream each file, tagging every event with its user's bucket."""
    for path, day in zip(batch["path"], batch["day"]):
        report = SkipReport()
        f = LogFile(dt.date.fromisoformat(str(day)), str(path))
        for t in iter_file(f, max_bad_fraction=max_bad_fraction, report=report, columns=[], ids=ids,
                           ts_unit=ts_unit):
            t = t.select([USER, ITEM, TS])
            yield t.append_column("bucket", pa.array(_bucket_of(t.column(USER).to_numpy(), num_buckets)))
        counter.read.remote(report.rows_read)  # no wait: for the progress display only
        if report.rows_skipped:
            ray.get(counter.add.remote(f.path, dict(report.by_reason)))


def _bucket_to_sequences(table: pa.Table) -> pa.Table:
    return events_to_sequences(table.select([USER, ITEM, TS]).combine_chunks())


def _build_ray(files: list[LogFile], out_dir: str, max_bad_fraction: float, rows_per_bucket: int,
               ids: Optional[IdMapper], on_events: Optional[EventsFn], ts_unit: str) -> SequenceStats:
    ensure_ray()
    rows = count_rows(files, ts_unit=ts_unit)  # footers only; sizes the shuffle
    num_buckets = max(1, math.ceil(rows / rows_per_bucket))
    counter = SkipCounter.remote()
    # Read tasks of several files (about rows_per_bucket / 2 events each): fewer, larger blocks make the
    # shuffle's tasks and objects fewer (tasks x buckets objects); it was 1500 x 51 at 10^8 events with one file each.
    files_per_task = max(1, round(rows_per_bucket / 2 / max(1.0, rows / len(files))))
    items = [{"path": f.path, "day": f.day.isoformat()} for f in files]
    read_tasks = math.ceil(len(items) / files_per_task)
    ds = ray.data.from_items(items, override_num_blocks=read_tasks)
    ds.context.shuffle_strategy = shuffle_strategy(read_tasks, num_buckets)  # this dataset's context only
    ds = ds.map_batches(
        _read_files,
        batch_size=files_per_task,
        batch_format="numpy",
        fn_kwargs={"num_buckets": num_buckets, "max_bad_fraction": max_bad_fraction, "counter": counter,
                   "ids": ids, "ts_unit": ts_unit},
    )
    ds = ds.groupby("bucket", num_partitions=num_buckets).map_groups(_bucket_to_sequences, batch_format="pyarrow")
    try:
        with polled(counter, rows, on_events):
            ds.write_parquet(out_dir)
    except Exception as e:  # Ray wraps task errors; surface the LogError itself
        reraise(e)
    report = collect_skips(counter, rows)
    ray.kill(counter)
    report.warn()
    out_rows = sum(pq.ParquetFile(os.path.join(out_dir, p)).metadata.num_rows for p in _parquet_names(out_dir))
    return SequenceStats(out_dir, out_rows, rows - report.rows_skipped, report)


# ---------------------------------------------------------------- list columns as numpy


def list_parts(arr) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (offsets (R+1,) int64 from 0, flat values). Handles chunked and sliced arrays."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    off = arr.offsets.to_numpy().astype(np.int64)
    values = arr.flatten()
    if pa.types.is_timestamp(values.type):
        values = values.cast(pa.int64())
    return off - off[0], values.to_numpy(zero_copy_only=False)


def gather_slices(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the slices [starts[r], starts[r] + lengths[r]) and their list offsets (R+1,)."""
    lengths = np.asarray(lengths, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    row = np.repeat(np.arange(len(lengths)), lengths)
    idx = np.asarray(starts, np.int64)[row] + (np.arange(offsets[-1]) - offsets[:-1][row])
    return idx, offsets


def make_list(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType = pa.int64()) -> pa.Array:
    """(offsets, flat values) -> list<value_type>; int32 offsets, as every shard here is far below 2**31 values."""
    assert offsets[-1] < 2**31, "a list column this large needs large_list"
    vals = pa.array(values, type=pa.int64())
    if value_type != pa.int64():
        vals = vals.cast(value_type)
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), vals)


# ---------------------------------------------------------------- reading back


def _parquet_names(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".parquet") and not n.startswith((".", "_")))


def sequence_files(seq_dir: PathLike) -> list[str]:
    seq_dir = os.fspath(seq_dir)
    if not os.path.isdir(seq_dir):
        raise LogError(seq_dir, "sequence directory does not exist")
    return [os.path.join(seq_dir, n) for n in _parquet_names(seq_dir)]


def read_sequences(seq_dir: PathLike) -> pa.Table:
    """All shards as one table sorted by user_id (small data and tests)."""
    tables = [pq.read_table(p) for p in sequence_files(seq_dir)]
    table = pa.concat_tables(tables) if tables else SEQ_SCHEMA.empty_table()
    return table.sort_by(USER)
