"""The vocabulary stage: raw item and user ids (64-bit hashes, strings) -> dense rows of the item table.

    vocab = build_vocabulary(log_dir, days, cfg.data.vocab, backend="ray")   # counts over the training window
    vocab.save(work_dir / "vocab")                                           # items.parquet, users.parquet
    build_sequences(log_dir, ..., ids=vocab.id_map())                         # every reader maps on the fly

Items are counted over the training window, streamed file by file (Ray tasks with backend="ray"; the
partial counts are merged by a Ray Data group-by, so no process holds more than the distinct ids). Kept:
ids seen at least `min_count` times, at most `max_items` of them (0: all), most frequent first; rows are
assigned 1..V in order of (count descending, raw id ascending), so the same log always gives the same rows.
Every other item (too rare, or new after the training window, e.g. on the held-out day) maps to the
out-of-vocabulary id OOV_ITEM, beyond any table: the splits drop such events from training sequences and
histories and keep them as targets, which rank below every item (a miss), and results report their share.

String user ids map to 1..U in sorted order (all days, since evaluation users must map too); integer user
ids are kept as they are (grouping needs no dense range).

A log whose ids are already dense integers needs none of this (`data.vocab.build=auto` decides from the
footers: string ids, or an item id larger than the number of events, mean raw ids).
"""

import datetime as dt
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from data.config import VocabConfig
from data.ray_utils import ensure_ray, reraise, shuffle_strategy
from data.schema import (
    ITEM,
    USER,
    LogError,
    LogFile,
    PathLike,
    SkipReport,
    count_rows,
    iter_file,
    list_files,
    open_file,
)
from data.stats import num_items

VOCAB_META = "vocab.json"
OOV_ITEM = 2**62  # the id of every out-of-vocabulary item: beyond any item table
RAW, ROW, COUNT = "raw_id", "row", "count"


@dataclass
class IdMap:
    """Raw -> dense ids, applied by the log reader to every batch (data.schema.iter_file)."""

    item_raw: pa.Array  # raw item ids of rows 1..V, in row order
    user_raw: Optional[pa.Array] = None  # sorted raw string user ids (row = position + 1); None: kept as they are

    @property
    def num_items(self) -> int:
        return len(self.item_raw)

    @property
    def oov(self) -> int:
        """The id every out-of-vocabulary item maps to: outside any item table, however large."""
        return OOV_ITEM

    def items(self, raw: pa.Array) -> pa.Array:
        index = pc.index_in(_same_type(raw, self.item_raw.type, ITEM), value_set=self.item_raw)
        return pc.fill_null(pc.add(index.cast(pa.int64()), 1), OOV_ITEM)

    def users(self, raw: pa.Array) -> pa.Array:
        if self.user_raw is None:
            return raw
        index = pc.index_in(_same_type(raw, self.user_raw.type, USER), value_set=self.user_raw)
        if index.null_count:  # every user of the log is in the map: a miss is a bug, not data
            raise AssertionError("a user id is missing from the user map")
        return pc.add(index, 1).cast(pa.int64())


def _same_type(raw: pa.Array, want: pa.DataType, column: str) -> pa.Array:
    if raw.type == want:
        return raw
    if _kind(raw.type) != _kind(want):
        raise LogError(column, f"column '{column}' has type {raw.type} in one file and {want} in another")
    return raw.cast(want)


def _kind(t: pa.DataType) -> str:
    return "int" if pa.types.is_integer(t) else "str" if (pa.types.is_string(t) or pa.types.is_large_string(t)) \
        else str(t)


@dataclass
class Vocabulary:
    items: pa.Table  # raw_id, row (1..V), count: the kept items in row order
    users: Optional[pa.Table]  # raw_id, row; None when user ids are integers
    dropped_items: int  # distinct items of the window below min_count or beyond max_items
    dropped_events: int  # their events in the window

    @property
    def num_items(self) -> int:
        return self.items.num_rows

    def id_map(self) -> IdMap:
        users = None if self.users is None else self.users.column(RAW).combine_chunks()
        return IdMap(self.items.column(RAW).combine_chunks(), users)

    def counts(self) -> np.ndarray:
        """(V + 1,) int64 training-window events per row; row 0 (padding) is 0."""
        return np.concatenate([[0], self.items.column(COUNT).to_numpy()]).astype(np.int64)

    def raw_items(self, rows: np.ndarray) -> pa.Array:
        """Raw ids of item rows (null for a row beyond the vocabulary, e.g. of a larger table)."""
        rows = np.asarray(rows, np.int64)
        inside = (rows >= 1) & (rows <= self.num_items)
        taken = self.items.column(RAW).take(pa.array(np.where(inside, rows - 1, 0)))
        return pc.if_else(pa.array(inside), taken, pa.nulls(len(rows), taken.type))

    def raw_users(self, ids: np.ndarray) -> pa.Array:
        """Raw ids of dense user ids (integer user ids were kept as they are)."""
        if self.users is None:
            return pa.array(np.asarray(ids, np.int64))
        return self.users.column(RAW).take(pa.array(np.asarray(ids, np.int64) - 1))

    def summary(self) -> dict:
        return {"items": self.num_items, "dropped_items": self.dropped_items, "dropped_events": self.dropped_events,
                "users": None if self.users is None else self.users.num_rows}

    def save(self, out_dir: PathLike) -> str:
        """out_dir/items.parquet, users.parquet (string users only), vocab.json; the json is written last, so
        a directory without it is incomplete."""
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        meta = os.path.join(out_dir, VOCAB_META)
        if os.path.exists(meta):
            os.remove(meta)
        pq.write_table(self.items, os.path.join(out_dir, "items.parquet"))
        if self.users is not None:
            pq.write_table(self.users, os.path.join(out_dir, "users.parquet"))
        digest = hashlib.sha256()  # of the mapping as written: a checkpoint names the vocabulary it was trained on
        for name in ("items.parquet", "users.parquet"):
            if os.path.exists(os.path.join(out_dir, name)) and (name == "items.parquet" or self.users is not None):
                with open(os.path.join(out_dir, name), "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
        with open(meta + ".tmp", "w") as f:
            json.dump({**self.summary(), "sha256": digest.hexdigest()}, f, indent=1)
        os.replace(meta + ".tmp", meta)
        return out_dir

    @staticmethod
    def digest(vocab_dir: PathLike) -> Optional[str]:
        """The sha256 of a saved vocabulary's mapping (None for one saved before digests were written)."""
        path = os.path.join(os.fspath(vocab_dir), VOCAB_META)
        if not os.path.isfile(path):
            raise LogError(os.fspath(vocab_dir), f"not a complete vocabulary ({VOCAB_META} is missing)")
        with open(path) as f:
            return json.load(f).get("sha256")

    @classmethod
    def load(cls, vocab_dir: PathLike) -> "Vocabulary":
        vocab_dir = os.fspath(vocab_dir)
        meta_path = os.path.join(vocab_dir, VOCAB_META)
        if not os.path.isfile(meta_path):
            raise LogError(vocab_dir, f"not a complete vocabulary ({VOCAB_META} is missing)")
        with open(meta_path) as f:
            meta = json.load(f)
        users = pq.read_table(os.path.join(vocab_dir, "users.parquet")) if meta["users"] is not None else None
        return cls(pq.read_table(os.path.join(vocab_dir, "items.parquet")), users, meta["dropped_items"],
                   meta["dropped_events"])


# ---------------------------------------------------------------- deciding


def id_types(log_dir: PathLike, *, ts_unit: str = "timestamp") -> tuple[pa.DataType, pa.DataType]:
    """(user_id, item_id) types of the log's first file; LogError if files disagree on their kind. `ts_unit`
    (data.ts_unit): how an integer `ts` column is read, here and in every function below."""
    files = list_files(log_dir)
    if not files:
        raise LogError(log_dir, "the log has no files")
    types = []
    for f in files:
        schema = open_file(f.path, raw_ids=True, ts_unit=ts_unit).schema_arrow  # a LogError: not a log file
        types.append((schema.field(USER).type, schema.field(ITEM).type))
    for (u, i), f in zip(types, files):
        for name, t, first in ((USER, u, types[0][0]), (ITEM, i, types[0][1])):
            if _kind(t) != _kind(first):
                raise LogError(f.path, f"column '{name}' has type {t}, but {files[0].path} has {first}")
    return types[0]


def needs_vocabulary(log_dir: PathLike, cfg: VocabConfig,
                     types: Optional[tuple[pa.DataType, pa.DataType]] = None, *, ts_unit: str = "timestamp") -> bool:
    """build=always/never as configured; auto: string ids, or more possible item ids than events (hashes).
    `types`: id_types(log_dir) when the caller has them."""
    if cfg.build != "auto":
        return cfg.build == "always"
    user_t, item_t = types if types is not None else id_types(log_dir, ts_unit=ts_unit)
    if not (pa.types.is_integer(user_t) and pa.types.is_integer(item_t)):
        return True
    if cfg.min_count > 1 or cfg.max_items:
        return True
    return num_items(log_dir, ts_unit=ts_unit) > count_rows(list_files(log_dir), ts_unit=ts_unit)


# ---------------------------------------------------------------- building


def _file_counts(f: LogFile, column: str, max_bad_fraction: float,
                 ts_unit: str = "timestamp") -> tuple[pa.Table, SkipReport]:
    """(raw_id, count) of one file's valid rows."""
    report = SkipReport()
    parts = []
    for t in iter_file(f, max_bad_fraction=max_bad_fraction, report=report, columns=[], raw_ids=True,
                       ts_unit=ts_unit):
        vc = pc.value_counts(t.column(column).combine_chunks())
        parts.append(pa.table({RAW: vc.field("values"), COUNT: vc.field("counts")}))
    if not parts:
        return pa.table({RAW: pa.array([], pa.int64()), COUNT: pa.array([], pa.int64())}), report
    return _merge(parts), report


def _merge(parts: Iterable[pa.Table]) -> pa.Table:
    t = pa.concat_tables(list(parts), promote_options="permissive")
    return t.group_by(RAW).aggregate([(COUNT, "sum")]).rename_columns([RAW, COUNT])


_ROWS_PER_PARTITION = 4_000_000


def _count(files: list[LogFile], column: str, max_bad_fraction: float, backend: str,
           ts_unit: str = "timestamp") -> pa.Table:
    if backend == "arrow":
        return _merge([_file_counts(f, column, max_bad_fraction, ts_unit)[0] for f in files])
    ensure_ray()

    def count_batch(batch: dict) -> pa.Table:  # a Ray task; its arguments travel in the closure
        return _merge([_file_counts(LogFile(dt.date.fromisoformat(str(day)), str(path)), column,
                                    max_bad_fraction, ts_unit)[0] for path, day in zip(batch["path"], batch["day"])])

    items = [{"path": f.path, "day": f.day.isoformat()} for f in files]
    read_tasks = max(1, min(len(items), 64))
    # Sized from the footers' row count (a bound on the distinct ids), not Ray's default of 200 partitions:
    # a hash shuffle of 200 aggregator actors takes about 15 s to start on a laptop for a log of any size.
    partitions = max(1, min(200, math.ceil(count_rows(files, ts_unit=ts_unit) / _ROWS_PER_PARTITION)))
    ds = ray.data.from_items(items, override_num_blocks=read_tasks)
    ds.context.shuffle_strategy = shuffle_strategy(read_tasks, partitions)  # this dataset's context only
    try:
        merged = (ds.map_batches(count_batch, batch_format="numpy", batch_size=4)
                  .groupby(RAW, num_partitions=partitions).sum(COUNT))
        table = merged.to_arrow_refs()
        out = pa.concat_tables(ray.get(table)) if table else None
    except Exception as e:
        reraise(e)
    if out is None or out.num_rows == 0:
        return pa.table({RAW: pa.array([], pa.int64()), COUNT: pa.array([], pa.int64())})
    return out.rename_columns([RAW, COUNT])


def build_vocabulary(log_dir: PathLike, days: Optional[Iterable], cfg: VocabConfig, *,
                     max_bad_fraction: float = 0.001, backend: str = "ray",
                     user_type: Optional[pa.DataType] = None, ts_unit: str = "timestamp") -> Vocabulary:
    """The vocabulary of the training window `days` (None: every day); string user ids over all days.
    `user_type`: the log's user_id type when the caller has it (id_types), else read from the footers.
    `ts_unit`: how an integer `ts` column is read (data.ts_unit)."""
    user_type = user_type if user_type is not None else id_types(log_dir, ts_unit=ts_unit)[0]
    wanted = None if days is None else set(days)
    files = list_files(log_dir)
    window = [f for f in files if wanted is None or f.day in wanted]
    counts = _count(window, ITEM, max_bad_fraction, backend, ts_unit)
    order = pc.sort_indices(counts, sort_keys=[(COUNT, "descending"), (RAW, "ascending")])
    counts = counts.take(order)
    keep = pc.greater_equal(counts.column(COUNT), cfg.min_count)
    kept = counts.filter(keep)
    if cfg.max_items:
        kept = kept.slice(0, cfg.max_items)
    if kept.num_rows == 0:
        raise LogError(log_dir, "the vocabulary is empty: no item of the training window has at least "
                                f"data.vocab.min_count={cfg.min_count} events")
    items = pa.table({RAW: kept.column(RAW), ROW: pa.array(np.arange(1, kept.num_rows + 1), pa.int64()),
                      COUNT: kept.column(COUNT).cast(pa.int64())})
    dropped = counts.slice(kept.num_rows) if cfg.max_items else counts.filter(pc.invert(keep))
    users = None
    if not pa.types.is_integer(user_type):
        user_ids = _count(files, USER, max_bad_fraction, backend, ts_unit).column(RAW)
        user_ids = user_ids.take(pc.sort_indices(user_ids))
        users = pa.table({RAW: user_ids, ROW: pa.array(np.arange(1, len(user_ids) + 1), pa.int64())})
    return Vocabulary(items, users, dropped_items=dropped.num_rows,
                      dropped_events=int(pc.sum(dropped.column(COUNT)).as_py() or 0))
