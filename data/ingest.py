"""One importer for behaviour logs as they come: CSV, TSV, JSON lines or Parquet -> the day-partitioned log.

    python -m data.ingest events.csv --out LOG --user-col uid --item-col sku --ts-col event_time --ts-unit ms
    python -m data.ingest ratings.csv --out LOG --preset movielens-latest      # ml-latest, ml-20m/25m/32m
    python -m data.ingest ratings.dat --out LOG --preset movielens-1m          # also movielens-100k, recbole

The input is streamed in batches (bounded memory, any size). Ids stay as they are (integers, or strings:
the vocabulary stage maps them, data/vocab.py); timestamps become timestamp[us, UTC] from epoch numbers in
`--ts-unit` s, ms, us or ns, or from ISO-8601 text (`iso`; without an offset, UTC). Other columns are carried
along. Each day's events go to LOG/day=YYYY-MM-DD/part-NNNNN.parquet. Output is written under a temporary
name and renamed into place at the end, so an interrupted import leaves nothing that looks complete.

Bad input stops with one line naming the file, the column and the value: a missing column, a CSV row with
too few fields, an unknown --ts-unit, ids of two kinds in one column, a timestamp that does not parse.
"""

import argparse
import datetime as dt
import json
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from data.movielens import ML1M_COLUMNS, ML1M_EMPTY, recbole_header
from data.schema import DAY_US, EPOCH, EPOCH_UNITS, ITEM, TS, TS_TYPE, USER, LogError, PathLike, to_log_ts

FORMATS = ("csv", "tsv", "jsonl", "parquet")
TS_UNITS = (*EPOCH_UNITS, "iso")  # --ts-unit
_PER_SECOND = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}
BLOCK_BYTES = 16 << 20


@dataclass
class Source:
    """How to read one file: its format and which of its columns are the user, the item and the time."""

    format: str
    user_col: str = USER
    item_col: str = ITEM
    ts_col: str = TS
    ts_unit: str = "s"
    header: bool = True
    column_names: Optional[list[str]] = None  # when there is no header
    delimiter: Optional[str] = None  # csv ',' / tsv '\t' by default
    drop: list[str] = field(default_factory=list)  # columns not to carry along
    quote: bool = True  # csv/tsv: '"' quotes fields; False: every character is data (ids such as titles)
    typed_header: bool = False  # RecBole: a header of `name:type` fields, whose names are the columns


# Presets: MovieLens as published and RecBole atomic files; the file layouts are data.movielens's.
PRESETS = {
    "movielens-latest": Source("csv", "userId", "movieId", "timestamp", "s"),  # ratings.csv
    "movielens-100k": Source("tsv", "user", "item", "ts", "s", header=False,
                             column_names=["user", "item", "rating", "ts"]),  # u.data
    "movielens-1m": Source("csv", "user", "item", "seconds", "s", header=False, column_names=ML1M_COLUMNS,
                           delimiter=":", drop=ML1M_EMPTY, quote=False),  # ratings.dat, user::item::rating::seconds
    "recbole": Source("tsv", "user_id", "item_id", "timestamp", "s", typed_header=True, quote=False),  # *.inter
}


def guess_format(path: str) -> str:
    ext = path.lower().rsplit(".", 1)[-1]
    known = {"csv": "csv", "tsv": "tsv", "tab": "tsv", "jsonl": "jsonl", "ndjson": "jsonl", "json": "jsonl",
             "parquet": "parquet", "pq": "parquet"}
    if ext not in known:
        raise LogError(path, f"cannot tell the format from the extension .{ext}; pass --format "
                             f"({', '.join(FORMATS)})")
    return known[ext]


def read_batches(path: str, src: Source) -> Iterator[pa.RecordBatch]:
    """The file's rows, streamed. Ids are read as text from CSV/TSV (any id is a token) and cast back to
    int64 when the whole column is integral (see `_ids`)."""
    try:
        if src.format in ("csv", "tsv"):
            delimiter = src.delimiter or ("," if src.format == "csv" else "\t")
            names, skip = (None if src.header else src.column_names), 0
            if src.typed_header:
                names, skip = list(recbole_header(path)), 1
            read = pcsv.ReadOptions(block_size=BLOCK_BYTES, column_names=names, skip_rows=skip)
            convert = pcsv.ConvertOptions(column_types={src.user_col: pa.string(), src.item_col: pa.string()})
            parse = pcsv.ParseOptions(delimiter=delimiter, quote_char='"' if src.quote else False)
            yield from pcsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        elif src.format == "jsonl":
            yield from pjson.open_json(path, read_options=pjson.ReadOptions(block_size=BLOCK_BYTES))
        elif src.format == "parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=1 << 20)
        else:
            raise LogError(path, f"unknown format {src.format!r}; expected one of {', '.join(FORMATS)}")
    except pa.ArrowInvalid as e:  # e.g. "CSV parse error: Expected 4 columns, got 3: 1,2,3"
        raise LogError(path, f"cannot read it as {src.format}: {e}") from None


def timestamps(col: pa.Array, unit: str, path: str, name: str) -> pa.Array:
    """A time column -> timestamp[us, UTC]. Timestamps and integer epoch numbers go through the log reader's
    own conversion (data.schema.to_log_ts: exact, a LogError for a value out of range); floats are rounded
    to the microsecond."""
    if unit not in TS_UNITS:
        raise LogError(path, f"unknown --ts-unit {unit!r}; expected one of {', '.join(TS_UNITS)}")
    if pa.types.is_timestamp(col.type):
        if not col.type.tz:  # naive: the time is UTC
            col = col.cast(pa.timestamp(col.type.unit, tz="UTC"))
        return to_log_ts(col, path, name)
    if pa.types.is_integer(col.type) and unit in EPOCH_UNITS:
        return to_log_ts(col, path, name, unit)
    if unit == "iso":
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise LogError(path, f"column '{name}' has type {col.type}, but --ts-unit iso needs text")
        try:
            return col.cast(TS_TYPE)
        except pa.ArrowInvalid:
            try:  # no zone offset: the time is UTC
                return col.cast(pa.timestamp("us")).cast(TS_TYPE)
            except pa.ArrowInvalid as e:
                raise LogError(path, f"column '{name}': {e}") from None
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise LogError(path, f"column '{name}' has type {col.type}, but --ts-unit {unit} needs numbers "
                             f"(first value {col[0].as_py()!r}); use --ts-unit iso for text")
    us = pc.round(pc.multiply(col.cast(pa.float64()), 1e6 / _PER_SECOND[unit]))
    try:
        return us.cast(pa.int64()).cast(TS_TYPE)
    except pa.ArrowInvalid:  # beyond int64 microseconds (or NaN)
        bad = pc.filter(col, pc.or_(pc.invert(pc.is_finite(us)), pc.greater_equal(pc.abs(us), 2.0**63)))
        raise LogError(path, f"column '{name}' has value {bad[0].as_py() if len(bad) else '?'}, outside the range "
                             "of timestamp[us]") from None


class _Kinds:
    """Each id column keeps one kind for the whole import: int64 when its first batch is all integers,
    else text; a later batch of the other kind is an error naming the value."""

    def __init__(self) -> None:
        self.kind: dict[str, str] = {}

    def __call__(self, col: pa.Array, path: str, name: str) -> pa.Array:
        if pa.types.is_floating(col.type):
            raise LogError(path, f"column '{name}' holds floats (first value {col[0].as_py()!r}); ids must be "
                                 "integers or text")
        as_int = col if pa.types.is_integer(col.type) else _try_int(col)
        if as_int is None and _all_numbers(col):  # "1.5", "2e3": a float written as text is not a token
            raise LogError(path, f"column '{name}' holds floats (first value {col[0].as_py()!r}); ids must be "
                                 "integers or text")
        kind = self.kind.setdefault(name, "int" if as_int is not None else "str")
        if kind == "int":
            if as_int is None:
                bad = next(v for v in col.to_pylist() if v is not None and not str(v).lstrip("-").isdigit())
                raise LogError(path, f"column '{name}' mixes integer ids with text such as {bad!r}")
            return as_int.cast(pa.int64())
        return col.cast(pa.string())


def _all_numbers(col: pa.Array) -> bool:
    """Every value parses as a number and some are written as decimals ("1.5", "2e3")."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return False
    try:
        col.cast(pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return bool(pc.any(pc.match_substring_regex(col, r"[.eE]")).as_py())


def _try_int(col: pa.Array) -> Optional[pa.Array]:
    """The column as int64 when every value is an integer written canonically ("7", not "007" or "+7":
    those are distinct tokens), else None."""
    try:
        as_int = col.cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    same = pc.equal(as_int.cast(pa.string()), col.cast(pa.string()))
    return as_int if pc.all(same).as_py() is not False else None


def normalise(batch: pa.RecordBatch, src: Source, path: str, kinds: _Kinds) -> pa.Table:
    table = pa.Table.from_batches([batch])
    for name in (src.user_col, src.item_col, src.ts_col):
        if name not in table.column_names:
            raise LogError(path, f"missing column '{name}' (columns: {', '.join(table.column_names)}); "
                                 "name it with --user-col / --item-col / --ts-col")
    cols = {
        USER: kinds(table.column(src.user_col).combine_chunks(), path, src.user_col),
        ITEM: kinds(table.column(src.item_col).combine_chunks(), path, src.item_col),
        TS: timestamps(table.column(src.ts_col).combine_chunks(), src.ts_unit, path, src.ts_col),
    }
    taken = {src.user_col, src.item_col, src.ts_col, *src.drop}
    for name in table.column_names:
        if name not in taken and name not in cols:
            cols[name] = table.column(name)
    return pa.table(cols)


class _DayWriters:
    """One Parquet writer per day partition under `root`, opened on the day's first rows."""

    def __init__(self, root: str, part: int) -> None:
        self.root, self.part = root, part
        self.writers: dict[int, pq.ParquetWriter] = {}
        self.days: dict[int, int] = {}

    def write(self, table: pa.Table) -> None:
        day = pc.cast(table.column(TS), pa.int64()).to_numpy() // DAY_US
        order = np.argsort(day, kind="stable")
        uniq, starts = np.unique(day[order], return_index=True)
        for d, a, b in zip(uniq, starts, [*starts[1:], len(order)]):
            rows = table.take(pa.array(order[a:b]))
            if d not in self.writers:
                folder = os.path.join(self.root, f"day={(EPOCH + dt.timedelta(days=int(d))).isoformat()}")
                os.makedirs(folder, exist_ok=True)
                self.writers[d] = pq.ParquetWriter(os.path.join(folder, f"part-{self.part:05d}.parquet"),
                                                   rows.schema)
            try:
                self.writers[d].write_table(rows)
            except ValueError as e:  # a later batch with another schema (e.g. a column type changed)
                raise LogError(self.root, f"rows of day {int(d)} do not match the first ones: {e}") from None
            self.days[d] = self.days.get(d, 0) + rows.num_rows

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def ingest(paths: Sequence[PathLike], out_dir: PathLike, src: Source) -> dict:
    """Import `paths` (one Source for all) into the log `out_dir`; returns a summary (also _ingest.json)."""
    out_dir = os.fspath(out_dir)
    if os.path.isdir(out_dir) and any(not n.startswith((".", "_")) for n in os.listdir(out_dir)):
        raise LogError(out_dir, "already holds data; import into an empty or new directory")
    tmp = out_dir.rstrip("/") + ".ingest-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    kinds = _Kinds()
    events = 0
    days: dict[int, int] = {}
    try:
        for part, path in enumerate(os.fspath(p) for p in paths):
            if not os.path.isfile(path):
                raise LogError(path, "no such file")
            writers = _DayWriters(tmp, part)
            try:
                for batch in read_batches(path, src):
                    table = normalise(batch, src, path, kinds)
                    writers.write(table)
                    events += table.num_rows
            finally:
                writers.close()
            for d, n in writers.days.items():
                days[d] = days.get(d, 0) + n
        if not events:
            raise LogError(paths[0] if paths else out_dir, "no events to import")
        summary = {"sources": [os.path.abspath(os.fspath(p)) for p in paths], "format": src.format,
                   "events": events, "days": len(days), "user_id": kinds.kind.get(src.user_col),
                   "item_id": kinds.kind.get(src.item_col),
                   "first_day": (EPOCH + dt.timedelta(days=int(min(days)))).isoformat(),
                   "last_day": (EPOCH + dt.timedelta(days=int(max(days)))).isoformat()}
        with open(os.path.join(tmp, "_ingest.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="input files, all of one format")
    p.add_argument("--out", required=True, help="the log directory to write (new or empty)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a known source: format and column names")
    p.add_argument("--format", choices=FORMATS, help="default: from the file extension")
    p.add_argument("--user-col", help=f"default {USER}")
    p.add_argument("--item-col", help=f"default {ITEM}")
    p.add_argument("--ts-col", help=f"default {TS}")
    p.add_argument("--ts-unit", help="s, ms, us, ns (epoch numbers) or iso (text); default s")
    p.add_argument("--delimiter", help="for csv/tsv, when not ',' or tab")
    p.add_argument("--no-header", action="store_true", help="csv/tsv without a header (then give --columns)")
    p.add_argument("--columns", help="comma-separated column names of a file without a header")
    p.add_argument("--drop", default="", help="comma-separated columns not to carry along")
    a = p.parse_args(argv)
    try:
        src = replace(PRESETS[a.preset]) if a.preset else Source(a.format or guess_format(a.paths[0]))
        if a.format:
            src.format = a.format
        for key in ("user_col", "item_col", "ts_col", "ts_unit", "delimiter"):
            if getattr(a, key) is not None:
                setattr(src, key, getattr(a, key))
        if a.no_header or a.columns:
            src.header, src.column_names = False, a.columns.split(",") if a.columns else src.column_names
        src.drop = [*src.drop, *(c for c in a.drop.split(",") if c)]  # a preset's own, and --drop
        print(json.dumps(ingest(a.paths, a.out, src)))
    except LogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
