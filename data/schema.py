"""The behaviour-log format and its validating, streaming reader.

A log is a directory hive-partitioned by UTC day, one row per event:

    LOG/day=2026-01-01/part-00000.parquet    user_id int64, item_id int64, ts timestamp[*, tz=UTC], extras...

`ts` may instead hold integers counting seconds, ms, us or ns since 1970-01-01 UTC when the reader is told
the unit (`ts_unit`, the config's `data.ts_unit`); they are read exactly as a timestamp column of that unit.

Names starting with `_` or `.` are not data (metadata such as `_synth.json`, `_maps/`). What stops the job
(a LogError naming the file) and what is skipped with a warning is listed in docs/data.md.
"""

import datetime as dt
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple, Optional, Protocol, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

USER, ITEM, TS = "user_id", "item_id", "ts"
TS_TYPE = pa.timestamp("us", tz="UTC")
LOG_SCHEMA = pa.schema([(USER, pa.int64()), (ITEM, pa.int64()), (TS, TS_TYPE)])
DAY_US = 86_400_000_000
_UTC_NAMES = {"UTC", "utc", "Etc/UTC", "+00:00", "Z", "GMT"}
_DAY_DIR = re.compile(r"^day=(\d{4}-\d{2}-\d{2})$")
EPOCH = dt.date(1970, 1, 1)
# How the reader takes an integer `ts` column (data.ts_unit): "timestamp" refuses integers (their unit is
# unknown); "s", "ms", "us", "ns" read them as that many units since the epoch. Timestamp columns are
# accepted under every setting (they carry their own unit).
EPOCH_UNITS = ("s", "ms", "us", "ns")
TS_UNITS = ("timestamp", *EPOCH_UNITS)
_INT64_MAX = 2**63 - 1
_US_PER = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 1}  # ns are divided (truncated), never overflow

PathLike = Union[str, os.PathLike]
DayLike = Union[str, dt.date]


class LogError(ValueError):
    """A log that cannot be used as it is: names the file (or day directory) and the problem."""

    def __init__(self, path: PathLike, problem: str) -> None:
        super().__init__(str(path), problem)  # args kept as (path, problem) so it pickles across Ray
        self.path = str(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class SkipReport:
    """Rows dropped by the reader, by reason and by file. Nothing is dropped without being counted here."""

    rows_read: int = 0
    by_reason: Counter = field(default_factory=Counter)
    by_file: dict = field(default_factory=dict)  # path -> Counter of reasons

    @property
    def rows_skipped(self) -> int:
        return sum(self.by_reason.values())

    def add(self, path: str, counts: dict, rows: int = 0) -> None:
        self.rows_read += rows
        if counts:
            self.by_reason.update(counts)
            self.by_file.setdefault(path, Counter()).update(counts)

    def warn(self) -> None:
        """Log one warning per file with skipped rows (the caller decides when)."""
        for path, counts in sorted(self.by_file.items()):
            log.warning("skipped %d bad rows in %s: %s", sum(counts.values()), path, dict(counts))

    def to_dict(self) -> dict:
        return {"rows_read": self.rows_read, "rows_skipped": self.rows_skipped, "by_reason": dict(self.by_reason)}


class IdMapper(Protocol):
    """Raw ids -> dense int64 ids (data.vocab.IdMap): applied to every batch after validation. Items outside
    the vocabulary map to the row `oov`."""

    @property
    def oov(self) -> int: ...

    def items(self, raw: pa.Array) -> pa.Array: ...

    def users(self, raw: pa.Array) -> pa.Array: ...


class LogFile(NamedTuple):
    day: dt.date
    path: str


# ---------------------------------------------------------------- days and files


def to_date(day: DayLike) -> dt.date:
    return day if isinstance(day, dt.date) else dt.date.fromisoformat(day)


def day_start_us(day: DayLike) -> int:
    """Microseconds since the epoch at 00:00 UTC of `day`."""
    return (to_date(day) - EPOCH).days * DAY_US


def day_dir(log_dir: PathLike, day: DayLike) -> str:
    return os.path.join(os.fspath(log_dir), f"day={to_date(day).isoformat()}")


def _visible(name: str) -> bool:
    return not (name.startswith("_") or name.startswith("."))


def list_days(log_dir: PathLike) -> list[dt.date]:
    """The day partitions present, sorted. Any other visible entry is a LogError (nothing is ignored silently)."""
    log_dir = os.fspath(log_dir)
    if not os.path.isdir(log_dir):
        raise LogError(log_dir, "log directory does not exist")
    days = []
    for name in sorted(os.listdir(log_dir)):
        if not _visible(name):
            continue
        m = _DAY_DIR.match(name)
        path = os.path.join(log_dir, name)
        if not m or not os.path.isdir(path):
            raise LogError(path, "expected a partition directory named day=YYYY-MM-DD")
        try:
            days.append(dt.date.fromisoformat(m.group(1)))
        except ValueError:
            raise LogError(path, f"partition name has an impossible date {m.group(1)!r}") from None
    return days


def list_files(
    log_dir: PathLike, start_day: Optional[DayLike] = None, end_day: Optional[DayLike] = None
) -> list[LogFile]:
    """Data files of days in [start_day, end_day) (either bound may be None), sorted by day then path."""
    lo = to_date(start_day) if start_day is not None else None
    hi = to_date(end_day) if end_day is not None else None
    files = []
    for day in list_days(log_dir):
        if (lo is not None and day < lo) or (hi is not None and day >= hi):
            continue
        root = day_dir(log_dir, day)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if _visible(d))
            files.extend(LogFile(day, os.path.join(dirpath, f)) for f in sorted(filenames) if _visible(f))
    return files


def count_rows(files: Sequence[LogFile], *, ts_unit: str = "timestamp") -> int:
    """Total rows from the Parquet footers (no data read); each file's schema is checked (open_file)."""
    return sum(open_file(f.path, raw_ids=True, ts_unit=ts_unit).metadata.num_rows for f in files)


def require_day(log_dir: PathLike, day: DayLike, *, ts_unit: str = "timestamp") -> None:
    """Evaluation needs `day`: a LogError naming it when it is missing or holds no events."""
    path = day_dir(log_dir, day)
    files = list_files(log_dir, day, to_date(day) + dt.timedelta(days=1))
    if not files:
        raise LogError(path, f"no events on evaluation day {to_date(day).isoformat()} (partition missing or empty)")
    if count_rows(files, ts_unit=ts_unit) == 0:
        raise LogError(path, f"no events on evaluation day {to_date(day).isoformat()} (its files hold 0 rows)")


# ---------------------------------------------------------------- one file


def open_file(path: str, raw_ids: bool = False, *, ts_unit: str = "timestamp") -> pq.ParquetFile:
    """Open and check the schema (check_schema); a LogError for anything that is not a usable log file."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise LogError(path, f"not a readable Parquet file (truncated or another format): {e}") from None
    check_schema(pf.schema_arrow, path, raw_ids, ts_unit=ts_unit)
    return pf


def is_raw_id_type(t: pa.DataType) -> bool:
    """Types a raw id may have: any integer, or a string."""
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def check_ts_unit(ts_unit: str) -> None:
    if ts_unit not in TS_UNITS:
        raise ValueError(f"ts_unit must be one of {', '.join(TS_UNITS)}, got {ts_unit!r}")


def check_schema(schema: pa.Schema, path: str, raw_ids: bool = False, *, ts_unit: str = "timestamp") -> None:
    """`raw_ids`: ids may be any integers or strings (the vocabulary maps them); else integers >= 0 / >= 1.

    `ts_unit` (data.ts_unit): "timestamp" wants `ts` as timestamp[*, tz=UTC]; "s", "ms", "us" or "ns" also
    take an integer `ts` counting those units since the epoch. A timestamp column is accepted under every
    setting: it carries its own unit, so nothing is ambiguous, and a log whose files mix the two kinds (or a
    config reused across logs) still reads. An integer column without a unit is refused: guessing s vs ms
    would shift every event by a factor of 1000.
    """
    check_ts_unit(ts_unit)
    for name in (USER, ITEM, TS):
        if name not in schema.names:
            raise LogError(path, f"missing column '{name}' (columns: {', '.join(schema.names)})")
    for name in (USER, ITEM):
        t = schema.field(name).type
        if raw_ids and not is_raw_id_type(t):
            raise LogError(path, f"column '{name}' has type {t}, expected integer or string ids")
        if not raw_ids and not pa.types.is_integer(t):
            hint = "; string ids need the vocabulary stage (data.vocab.build)" if is_raw_id_type(t) else ""
            raise LogError(path, f"column '{name}' has type {t}, expected an integer type (int64){hint}")
    t = schema.field(TS).type
    if pa.types.is_integer(t):
        if ts_unit == "timestamp":
            raise LogError(path, f"column 'ts' has type {t}, expected timestamp with tz=UTC; for integer times "
                                 "since the epoch set data.ts_unit=s|ms|us|ns")
        return
    if not pa.types.is_timestamp(t):
        also = f" or integers (data.ts_unit={ts_unit})" if ts_unit != "timestamp" else ""
        raise LogError(path, f"column 'ts' has type {t}, expected timestamp with tz=UTC{also}; other time "
                             "formats (text, floats) can be imported with convformer-ingest")
    if t.tz not in _UTC_NAMES:
        raise LogError(path, f"column 'ts' has type {t}; timestamps must be in UTC (tz='UTC'), not {t.tz!r}")


def to_log_ts(col: Union[pa.Array, pa.ChunkedArray], path: str, name: str = TS,
              unit: Optional[str] = None) -> Union[pa.Array, pa.ChunkedArray]:
    """A timestamp column, or integers counting `unit` (s, ms, us, ns) since the epoch, -> timestamp[us, UTC].

    Exact: integers are read as a timestamp of their unit, the conversion a timestamp column of that unit
    gets (ns are truncated to us, toward zero). A value that does not fit timestamp[us] (beyond about
    292,000 years from 1970) is a LogError naming the file, the column and the value. The reader and the
    importer (data/ingest.py) both convert with this.
    """
    if pa.types.is_integer(col.type):
        if unit not in EPOCH_UNITS:
            raise ValueError(f"integer times need a unit ({', '.join(EPOCH_UNITS)}), got {unit!r}")
        if col.type != pa.int64():
            try:
                col = col.cast(pa.int64())
            except pa.ArrowInvalid:
                raise LogError(path, f"column '{name}' has value {pc.max(col).as_py()}, which does not fit "
                                     "int64") from None
        col = col.cast(pa.timestamp(unit, tz="UTC"))
    t = col.type
    if t == TS_TYPE:
        return col
    if t.unit == "ns":
        return col.cast(TS_TYPE, safe=False)  # truncates; the tie rule then orders same-us events by item id
    try:
        return col.cast(TS_TYPE)  # s, ms: checked multiplication
    except pa.ArrowInvalid:
        values = pc.fill_null(col.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
        bound = _INT64_MAX // _US_PER[t.unit]
        bad = values[(values > bound) | (values < -bound)]
        shown = bad[0] if len(bad) else "?"
        raise LogError(path, f"column '{name}' has value {shown} ({t.unit} since 1970-01-01), outside the range "
                             "of timestamp[us] (about 292,000 years either side of 1970)") from None


def _normalise(batch: pa.RecordBatch, path: str, raw_ids: bool = False, *, ts_unit: str = "timestamp") -> pa.Table:
    """ids to int64 (raw ids stay as they are), ts to timestamp[us, UTC] (integers: `ts_unit`s since the
    epoch, see to_log_ts); extra columns untouched."""
    table = pa.Table.from_batches([batch])
    for name in () if raw_ids else (USER, ITEM):
        col = table.column(name)
        if col.type != pa.int64():
            try:
                col = col.cast(pa.int64())
            except pa.ArrowInvalid as e:
                raise LogError(path, f"column '{name}' has values that do not fit int64: {e}") from None
            table = table.set_column(table.schema.get_field_index(name), name, col)
    col = table.column(TS)
    if col.type != TS_TYPE:
        table = table.set_column(table.schema.get_field_index(TS), TS, to_log_ts(col, path, TS, ts_unit))
    return table


_REASONS = ("null value", "negative user_id", "item_id <= 0 (0 is padding)", "ts outside its day partition")


def _bad_rows(table: pa.Table, lo_us: int, raw_ids: bool = False) -> tuple[Optional[np.ndarray], Counter]:
    """Mask of rows to keep (None: all good) and counts by first failing reason. Raw ids are only checked for
    nulls (any value is an id)."""
    user, item, ts = table.column(USER), table.column(ITEM), table.column(TS)
    if raw_ids:
        if table.num_rows == 0:
            return None, Counter()
        null = np.zeros(table.num_rows, bool)
        for col in (user, item, ts):
            if col.null_count:
                null |= col.is_null().to_numpy(zero_copy_only=False)
        t = pc.cast(ts, pa.int64()).to_numpy(zero_copy_only=False)
        no = np.zeros(table.num_rows, bool)
        with np.errstate(invalid="ignore"):
            return _tally(table.num_rows, [null, no, no, (t < lo_us) | (t >= lo_us + DAY_US)])
    nulls = user.null_count + item.null_count + ts.null_count
    if table.num_rows == 0:
        return None, Counter()
    ts_us = pc.cast(ts, pa.int64())
    # Fast path: one min/max per column decides most batches.
    if nulls == 0:
        umin = pc.min(user).as_py()
        imin = pc.min(item).as_py()
        tmm = pc.min_max(ts_us)
        if umin >= 0 and imin > 0 and tmm["min"].as_py() >= lo_us and tmm["max"].as_py() < lo_us + DAY_US:
            return None, Counter()
    u = user.to_numpy(zero_copy_only=False)
    i = item.to_numpy(zero_copy_only=False)
    t = ts_us.to_numpy(zero_copy_only=False)
    null = np.zeros(table.num_rows, bool)
    for col in (user, item, ts):
        if col.null_count:
            null |= col.is_null().to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        checks = [null, u < 0, i <= 0, (t < lo_us) | (t >= lo_us + DAY_US)]
    return _tally(table.num_rows, checks)


def _tally(num_rows: int, checks: list) -> tuple[Optional[np.ndarray], Counter]:
    """Keep-mask and counts, each row under its first failing check."""
    bad = np.zeros(num_rows, bool)
    counts: Counter = Counter()
    for reason, mask in zip(_REASONS, checks):
        new = mask & ~bad  # each row counted once, under its first failing reason
        if new.any():
            counts[reason] = int(new.sum())
            bad |= new
    return ~bad, counts


def iter_file(
    f: LogFile,
    *,
    max_bad_fraction: float,
    report: SkipReport,
    columns: Optional[Sequence[str]] = None,
    batch_rows: int = 1 << 20,
    raw_ids: bool = False,
    ids: Optional[IdMapper] = None,
    ts_unit: str = "timestamp",
) -> Iterator[pa.Table]:
    """Stream one file's valid rows (row group by row group), normalised to LOG_SCHEMA types.

    Bad rows are skipped and counted in `report`; once they exceed `max_bad_fraction` of the file's rows
    the file stops the job with a LogError. `raw_ids`: ids as they are (integers or strings), checked for
    nulls only; `ids`: raw ids mapped to dense int64 ones after validation (implies raw_ids). `ts_unit`: how
    an integer `ts` column is read (check_schema, to_log_ts); the day-partition check applies to the result.
    """
    raw_ids = raw_ids or ids is not None
    pf = open_file(f.path, raw_ids, ts_unit=ts_unit)
    total = pf.metadata.num_rows
    allowed = int(max_bad_fraction * total)
    lo = day_start_us(f.day)
    cols = None if columns is None else list(dict.fromkeys([USER, ITEM, TS, *columns]))
    skipped: Counter = Counter()
    try:
        batches = pf.iter_batches(batch_size=batch_rows, columns=cols)
        for batch in batches:
            table = _normalise(batch, f.path, raw_ids, ts_unit=ts_unit)
            keep, counts = _bad_rows(table, lo, raw_ids)
            if counts:
                skipped.update(counts)
                if sum(skipped.values()) > allowed:
                    detail = ", ".join(f"{n} {r}" for r, n in skipped.items())
                    raise LogError(
                        f.path,
                        f"bad rows ({detail}) exceed data.max_bad_fraction={max_bad_fraction} of its {total} rows"
                        f" (partition day={f.day.isoformat()})",
                    )
                table = table.filter(pa.array(keep))
            if ids is not None:
                table = _map_ids(table, ids, f.path)
            yield table
    except (pa.ArrowInvalid, OSError) as e:
        raise LogError(f.path, f"corrupt Parquet data: {e}") from None
    report.add(f.path, dict(skipped), total)


def _map_ids(table: pa.Table, ids: IdMapper, path: str) -> pa.Table:
    for name, fn in ((ITEM, ids.items), (USER, ids.users)):
        try:
            col = fn(table.column(name).combine_chunks())
        except LogError as e:
            raise LogError(path, e.problem) from None
        table = table.set_column(table.schema.get_field_index(name), name, col.cast(pa.int64()))
    return table


def ts_from_seconds(seconds: Iterable[float]) -> pa.Array:
    """Unix seconds (int or float) to timestamp[us, UTC]."""
    us = np.round(np.asarray(seconds, dtype=np.float64) * 1e6).astype(np.int64)
    return pa.array(us, type=pa.int64()).cast(TS_TYPE)
