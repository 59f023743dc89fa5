"""Train / evaluation splits of user sequences: held-out day (industrial) and leave-one-out (public benchmarks).

The row functions (`train_rows`, `eval_rows`, `loo_rows`) are pure functions of a batch of sequence rows and
the dates: no state, no clocks, the same output on any machine or back end. Midnight belongs to the day
it starts: an event at exactly 00:00:00 UTC of day D is on day D. Within a day the order is the tie rule
of data/sequences.py (ts, then item_id), so of two events at the same instant the smaller item id is first.

Evaluation queries (Parquet, one row per query):
  user_id     int64
  history     list<int64>  the last `query_len` items before the target, oldest first
  target      int64        the next item: first event on day D (held-out) or the held-out last event (LOO)
  day_items   list<int64>  all items of day D in order (LOO: [target]), for recall over the day
  seen_items  list<int64>  distinct items before the target, sorted, for excluding seen items
  n_history   int64        events before the target (the history may be cut to query_len)
"""

import datetime as dt
import os
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from data.ray_utils import EventsFn, ensure_ray, reraise
from data.schema import (
    DAY_US,
    TS,
    TS_TYPE,
    USER,
    DayLike,
    IdMapper,
    LogError,
    PathLike,
    day_start_us,
    list_days,
    require_day,
    to_date,
)
from data.sequences import (
    SEQ_SCHEMA,
    build_sequences,
    gather_slices,
    list_parts,
    make_list,
    prepare_out,
    sequence_files,
)

QUERY_SCHEMA = pa.schema(
    [
        (USER, pa.int64()),
        ("history", pa.list_(pa.int64())),
        ("target", pa.int64()),
        ("day_items", pa.list_(pa.int64())),
        ("seen_items", pa.list_(pa.int64())),
        ("n_history", pa.int64()),
    ]
)


@dataclass
class SplitResult:
    train_sequences: str  # directory of the training split's sequence shards
    queries: dict  # name ("eval", or "valid"/"test" for leave-one-out) -> directory of query shards
    num_train_users: int
    num_queries: dict  # name -> number of queries
    eval_day: Optional[dt.date] = None  # held-out day (None for leave-one-out)


# ---------------------------------------------------------------- pure row functions


def _queries(user: np.ndarray, off: np.ndarray, items: np.ndarray, cut: np.ndarray, end: np.ndarray,
             query_len: int) -> pa.Table:
    """Queries whose target is items[off[r] + cut[r]], day items up to off[r] + end[r] (rows already selected)."""
    start = off[:-1]
    hist_len = np.minimum(cut, query_len)
    h_idx, h_off = gather_slices(start + cut - hist_len, hist_len)
    d_idx, d_off = gather_slices(start + cut, end - cut)
    # Distinct items before the target: sort (row, item) pairs and drop repeats.
    s_idx, s_off = gather_slices(start, cut)
    row = np.repeat(np.arange(len(cut)), cut)
    vals = items[s_idx]
    order = np.lexsort((vals, row))
    row, vals = row[order], vals[order]
    first = np.ones(len(vals), bool)
    first[1:] = (vals[1:] != vals[:-1]) | (row[1:] != row[:-1])
    seen_off = np.concatenate([[0], np.cumsum(np.bincount(row[first], minlength=len(cut)))])
    return pa.table(
        {
            USER: pa.array(user, pa.int64()),
            "history": make_list(h_off, items[h_idx]),
            "target": pa.array(items[start + cut], pa.int64()),
            "day_items": make_list(d_off, items[d_idx]),
            "seen_items": make_list(seen_off, vals[first]),
            "n_history": pa.array(cut, pa.int64()),
        },
        schema=QUERY_SCHEMA,
    )


def _counts_before(off: np.ndarray, ts: np.ndarray, bound_us: int) -> np.ndarray:
    """Per row, the number of events with ts < bound (rows are in time order, so they are a prefix)."""
    row = np.repeat(np.arange(len(off) - 1), np.diff(off))
    return np.bincount(row[ts < bound_us], minlength=len(off) - 1)


def eval_rows(seqs: pa.Table, eval_day: DayLike, query_len: int, min_history: int = 1) -> pa.Table:
    """Held-out-day queries: users with >= 1 event on `eval_day` and >= min_history events before it."""
    off, items = list_parts(seqs.column("item_ids"))
    _, ts = list_parts(seqs.column(TS))
    d0 = day_start_us(eval_day)
    before = _counts_before(off, ts, d0)
    through = _counts_before(off, ts, d0 + DAY_US)
    keep = np.flatnonzero((through > before) & (before >= min_history))
    user = seqs.column(USER).to_numpy()[keep]
    sub_off = np.concatenate([[0], np.cumsum(np.diff(off)[keep])])
    idx, _ = gather_slices(off[keep], np.diff(off)[keep])
    return _queries(user, sub_off, items[idx], before[keep], through[keep], query_len)


def train_rows(seqs: pa.Table, eval_day: DayLike, train_days: int = 0) -> pa.Table:
    """Each user's events on days [eval_day - train_days, eval_day) (all days before it when train_days=0)."""
    off, items = list_parts(seqs.column("item_ids"))
    _, ts = list_parts(seqs.column(TS))
    d0 = day_start_us(eval_day)
    lo = d0 - train_days * DAY_US if train_days else np.iinfo(np.int64).min
    row = np.repeat(np.arange(len(off) - 1), np.diff(off))
    inside = (ts >= lo) & (ts < d0)
    counts = np.bincount(row[inside], minlength=len(off) - 1)
    keep = counts > 0
    new_off = np.concatenate([[0], np.cumsum(counts[keep])])
    return pa.table(
        {
            USER: seqs.column(USER).filter(pa.array(keep)),
            "item_ids": make_list(new_off, items[inside]),
            TS: make_list(new_off, ts[inside], TS_TYPE),
        },
        schema=SEQ_SCHEMA,
    )


LooPart = Literal["train", "valid", "test"]


def loo_rows(seqs: pa.Table, part: LooPart, query_len: int) -> pa.Table:
    """Leave-one-out: test = last event, valid = second to last, train = the rest.

    Users with fewer than 3 events have nothing held out: their whole sequence is training data.
    """
    off, items = list_parts(seqs.column("item_ids"))
    lengths = np.diff(off)
    user = seqs.column(USER).to_numpy()
    if part == "train":
        cut = np.where(lengths >= 3, lengths - 2, lengths)
        idx, new_off = gather_slices(off[:-1], cut)
        _, ts = list_parts(seqs.column(TS))
        return pa.table(
            {USER: pa.array(user), "item_ids": make_list(new_off, items[idx]),
             TS: make_list(new_off, ts[idx], TS_TYPE)},
            schema=SEQ_SCHEMA,
        )
    keep = np.flatnonzero(lengths >= 3)
    drop = 2 if part == "valid" else 1  # position of the target from the end
    sub_off = np.concatenate([[0], np.cumsum(lengths[keep])])
    idx, _ = gather_slices(off[keep], lengths[keep])
    cut = lengths[keep] - drop
    return _queries(user[keep], sub_off, items[idx], cut, cut + 1, query_len)


# ---------------------------------------------------------------- drivers over sequence shards

Backend = Literal["ray", "arrow"]


def drop_item(table: pa.Table, item: int) -> pa.Table:
    """Remove `item` (the out-of-vocabulary row) from a split's lists: the events of a sequence table (rows
    left empty are dropped), or a query's history, day and seen items (its target stays: a miss)."""
    if "item_ids" in table.column_names:
        off, items = list_parts(table.column("item_ids"))
        _, ts = list_parts(table.column(TS))
        keep = items != item
        row = np.repeat(np.arange(table.num_rows), np.diff(off))
        counts = np.bincount(row[keep], minlength=table.num_rows)
        new_off = np.concatenate([[0], np.cumsum(counts[counts > 0])])
        return pa.table({USER: table.column(USER).filter(pa.array(counts > 0)),
                         "item_ids": make_list(new_off, items[keep]), TS: make_list(new_off, ts[keep], TS_TYPE)},
                        schema=SEQ_SCHEMA)
    for name in ("history", "day_items", "seen_items"):
        off, items = list_parts(table.column(name))
        keep = items != item
        row = np.repeat(np.arange(table.num_rows), np.diff(off))
        new_off = np.concatenate([[0], np.cumsum(np.bincount(row[keep], minlength=table.num_rows))])
        table = table.set_column(table.schema.get_field_index(name), name, make_list(new_off, items[keep]))
    return table


def _without(fn, oov: int):
    """fn's rows with the out-of-vocabulary row removed (oov 0: no vocabulary, fn itself)."""
    if not oov:
        return fn

    def rows(batch: pa.Table, **kwargs) -> pa.Table:
        return drop_item(fn(batch, **kwargs), oov)

    return rows


def _apply(seq_dir: PathLike, out_dir: str, fn, backend: Backend, oov: int = 0, **kwargs) -> int:
    """Write fn(batch, **kwargs) for every sequence shard to out_dir, less item `oov` (when not 0); returns
    rows written."""
    fn = _without(fn, oov)
    files = sequence_files(seq_dir)

    def one(i: int, path: str) -> int:
        out = fn(pq.read_table(path), **kwargs)
        if out.num_rows:
            pq.write_table(out, os.path.join(out_dir, f"part-{i:05d}.parquet"))
        return out.num_rows

    if backend == "arrow":
        return sum(one(i, path) for i, path in enumerate(files))
    if backend != "ray":
        raise ValueError(f"backend must be 'ray' or 'arrow', got {backend!r}")
    if not files:
        return 0
    ensure_ray()

    def shard(batch: dict) -> dict:
        return {"rows": np.array([one(int(i), str(p)) for i, p in zip(batch["i"], batch["path"])])}

    # One task per shard that reads and writes it (same file names as the arrow path): read_parquet +
    # write_parquet spent about 5 s a pass in Ray Data's scheduling on a log of any size.
    ds = ray.data.from_items([{"i": i, "path": p} for i, p in enumerate(files)], override_num_blocks=len(files))
    try:
        # a row per shard back to the driver (Dataset.sum would start an aggregator actor: seconds)
        return sum(int(r["rows"]) for r in ds.map_batches(shard, batch_format="numpy", batch_size=1).take_all())
    except Exception as e:
        reraise(e)


def held_out_day_split(
    seq_dir: PathLike,
    out_dir: PathLike,
    eval_day: DayLike,
    query_len: int,
    *,
    train_days: int = 0,
    min_history: int = 1,
    backend: Backend = "arrow",
    overwrite: bool = False,
    oov: int = 0,
) -> SplitResult:
    """Split sequences built through `eval_day` (build_sequences(cutoff_day=eval_day + 1 day)).

    Writes out_dir/train (sequences of the training window) and out_dir/eval (queries). `oov`: the
    out-of-vocabulary row, removed from training sequences and query histories (0: none).
    """
    out_dir = os.fspath(out_dir)
    day = to_date(eval_day)
    train_dir = prepare_out(os.path.join(out_dir, "train"), overwrite)
    eval_dir = prepare_out(os.path.join(out_dir, "eval"), overwrite)
    n_train = _apply(seq_dir, train_dir, train_rows, backend, oov, eval_day=day, train_days=train_days)
    n_eval = _apply(seq_dir, eval_dir, eval_rows, backend, oov, eval_day=day, query_len=query_len,
                    min_history=min_history)
    if n_eval == 0:
        raise LogError(
            seq_dir,
            f"no evaluation users on day {day.isoformat()}: nobody has an event that day and "
            f">= {min_history} events before it",
        )
    return SplitResult(train_dir, {"eval": eval_dir}, n_train, {"eval": n_eval}, day)


def leave_one_out(
    seq_dir: PathLike, out_dir: PathLike, query_len: int, *, backend: Backend = "arrow", overwrite: bool = False,
    oov: int = 0,
) -> SplitResult:
    """Writes out_dir/train (sequences minus the last two events), out_dir/valid and out_dir/test (queries)."""
    out_dir = os.fspath(out_dir)
    dirs = {part: prepare_out(os.path.join(out_dir, part), overwrite) for part in ("train", "valid", "test")}
    counts = {part: _apply(seq_dir, d, loo_rows, backend, oov, part=part, query_len=query_len)
              for part, d in dirs.items()}
    return SplitResult(dirs["train"], {"valid": dirs["valid"], "test": dirs["test"]}, counts["train"],
                       {"valid": counts["valid"], "test": counts["test"]})


def read_queries(path: PathLike) -> pa.Table:
    """All query shards of a directory, sorted by user_id."""
    tables = [pq.read_table(p) for p in sequence_files(path)]
    return (pa.concat_tables(tables) if tables else QUERY_SCHEMA.empty_table()).sort_by(USER)


# ---------------------------------------------------------------- the whole held-out pipeline


def resolve_eval_day(log_dir: PathLike, eval_day: Optional[DayLike]) -> dt.date:
    """The configured evaluation day, or the last day in the log."""
    if eval_day is not None:
        return to_date(eval_day)
    days = list_days(log_dir)
    if not days:
        raise LogError(log_dir, "the log has no day partitions")
    return days[-1]


def prepare_held_out(
    log_dir: PathLike,
    work_dir: PathLike,
    query_len: int,
    *,
    eval_day: Optional[DayLike] = None,
    train_days: int = 0,
    min_history: int = 1,
    backend: Backend = "ray",
    max_bad_fraction: float = 0.001,
    rows_per_bucket: int = 2_000_000,
    overwrite: bool = False,
    ids: Optional[IdMapper] = None,
    on_events: Optional[EventsFn] = None,
    ts_unit: str = "timestamp",
) -> SplitResult:
    """Log -> work_dir/sequences (through eval day) -> work_dir/train + work_dir/eval. `ids`: the vocabulary's
    raw -> dense map (None: dense integer ids); `on_events`: the sequence build's progress (build_sequences);
    `ts_unit`: how an integer `ts` column is read (data.ts_unit)."""
    day = resolve_eval_day(log_dir, eval_day)
    require_day(log_dir, day, ts_unit=ts_unit)
    seq_dir = os.path.join(os.fspath(work_dir), "sequences")
    build_sequences(log_dir, seq_dir, day + dt.timedelta(days=1), backend, max_bad_fraction=max_bad_fraction,
                    rows_per_bucket=rows_per_bucket, overwrite=overwrite, ids=ids, on_events=on_events,
                    ts_unit=ts_unit)
    return held_out_day_split(seq_dir, work_dir, day, query_len, train_days=train_days, min_history=min_history,
                              backend=backend, overwrite=overwrite, oov=ids.oov if ids is not None else 0)
