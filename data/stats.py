"""Item popularity over a training window, streamed from the log (used by popularity samplers and baselines)."""

import datetime as dt
import json
import os
from typing import Iterable, Optional, Union

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.schema import ITEM, DayLike, LogError, PathLike, SkipReport, iter_file, list_files, open_file, to_date
from data.sequences import list_parts, sequence_files


def item_counts(
    log_dir: PathLike,
    days: Optional[Union[Iterable[DayLike], tuple]] = None,
    num_items: int = 0,
    *,
    max_bad_fraction: float = 0.001,
    report: Optional[SkipReport] = None,
    ts_unit: str = "timestamp",
) -> np.ndarray:
    """Events per item id over `days`, as int64 of shape (num_items + 1,); index 0 (padding) is always 0.

    `days`: None for every day, or an iterable of days (dates or YYYY-MM-DD). Rows are validated like every
    other reader (bad rows skipped and counted in `report`); an id above num_items is a LogError. `ts_unit`:
    how an integer `ts` column is read (data.ts_unit, data.schema.check_schema).
    """
    wanted = None if days is None else {to_date(d) for d in days}
    report = report if report is not None else SkipReport()
    counts = np.zeros(num_items + 1, np.int64)  # (num_items + 1,)
    for f in list_files(log_dir):
        if wanted is not None and f.day not in wanted:
            continue
        for t in iter_file(f, max_bad_fraction=max_bad_fraction, report=report, columns=[], ts_unit=ts_unit):
            ids = t.column(ITEM)
            if len(ids) == 0:
                continue
            top = pc.max(ids).as_py()
            if top > num_items:
                raise LogError(f.path, f"item_id {top} is above num_items={num_items}")
            counts += np.bincount(ids.to_numpy(), minlength=num_items + 1)
    report.warn()
    return counts


def sequence_item_counts(seq_dir: PathLike, num_items: int) -> np.ndarray:
    """(num_items + 1,) int64 occurrences of each item in a directory of sequences (e.g. the training split)."""
    counts = np.zeros(num_items + 1, dtype=np.int64)
    for path in sequence_files(seq_dir):
        for batch in pq.ParquetFile(path).iter_batches(columns=["item_ids"]):
            _, items = list_parts(batch.column(0))
            counts += np.bincount(items, minlength=num_items + 1)[: num_items + 1]
    return counts


def window_days(eval_day: DayLike, train_days: int, log_days: Iterable[dt.date]) -> list[dt.date]:
    """The training days of a held-out split: [eval_day - train_days, eval_day), or every earlier day if 0."""
    d = to_date(eval_day)
    lo = d - dt.timedelta(days=train_days) if train_days else dt.date.min
    return [x for x in log_days if lo <= x < d]


def num_items(log_dir: PathLike, *, ts_unit: str = "timestamp") -> int:
    """The largest item id of a log (model.num_items must be at least this).

    From `_synth.json` (a log of dense generator ids) / `_movielens.json` when present, else from the Parquet
    row-group statistics (footers only, no data read); a file without statistics is scanned. `ts_unit`: as
    for item_counts.
    """
    root = os.fspath(log_dir)
    for meta, key in (("_synth.json", ("config", "items")), ("_movielens.json", ("items",))):
        path = os.path.join(root, meta)
        if os.path.isfile(path):
            with open(path) as f:
                value = json.load(f)
            if meta == "_synth.json" and value["config"].get("raw_ids", "dense") != "dense":
                break  # hashed ids: the footers know the largest
            for k in key:
                value = value[k]
            return int(value)
    top = 0
    for f in list_files(root):
        md = open_file(f.path, ts_unit=ts_unit).metadata  # a LogError for a file that is no usable log file
        col = md.schema.to_arrow_schema().get_field_index(ITEM)
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(col).statistics
            if st is None or not st.has_min_max:
                top = max(top, max((pc.max(t.column(ITEM)).as_py() or 0 for t in iter_file(
                    f, max_bad_fraction=1.0, report=SkipReport(), columns=[], ts_unit=ts_unit)), default=0))
                break
            top = max(top, int(st.max))
    return top
