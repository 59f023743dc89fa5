"""MovieLens ratings -> the day-partitioned log format.

    python -m data.movielens ml-1m/ratings.dat --out /tmp/ml1m-log

Formats (picked by file name, or --format):
  ml-100k   u.data        user \\t item \\t rating \\t unix seconds      (no header)
  ml-1m     ratings.dat   user::item::rating::unix seconds             (no header)
  ml-latest ratings.csv   userId,movieId,rating,timestamp with that header (ml-latest, ml-20m, ml-25m, ml-32m)
  recbole   *.inter       tab separated with a header of name:type fields, e.g.
                          user_id:token  item_id:token  rating:float  timestamp:float
                          (ids are tokens: any string, such as a movie title)

Ids are remapped densely: users and items sorted by their original id (numerically when every id is an
integer, else as strings) get 1, 2, ...; 0 stays free for padding. The maps are written to
OUT/_maps/{user,item}_map.parquet (columns user_id|item_id int64, original string). Each rating is one
event with its rating carried as an extra column. Events of a user with the same timestamp are ordered
by the log's tie rule (ts, then item id; docs/data.md). The ratings file is read into memory (the public
MovieLens files hold at most tens of millions of rows).
"""

import argparse
import datetime as dt
import json
import os
from typing import Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from data.schema import DAY_US, EPOCH, ITEM, TS, USER, PathLike, ts_from_seconds

Format = Literal["auto", "ml-100k", "ml-1m", "ml-latest", "recbole"]
LATEST_HEADER = "userId,movieId,rating,timestamp"
# ml-1m's '::' read as two one-character ':' delimiters with an empty field between (data.ingest's preset too)
ML1M_COLUMNS = ["user", "_1", "item", "_2", "rating", "_3", "seconds"]
ML1M_EMPTY = ["_1", "_2", "_3"]


def recbole_header(path: str) -> dict[str, str]:
    """A RecBole .inter file's header: column name -> its `name:type` field, in file order."""
    with open(path, "r") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    return {h.split(":")[0]: h for h in header}


def detect_format(path: str) -> str:
    name = os.path.basename(path)
    if name == "u.data":
        return "ml-100k"
    if name.endswith(".dat"):
        return "ml-1m"
    if name.endswith(".inter"):
        return "recbole"
    with open(path, "r", errors="replace") as f:
        first = f.readline()
    if first.strip() == LATEST_HEADER:
        return "ml-latest"
    if "::" in first:
        return "ml-1m"
    if ":token" in first or ":float" in first:
        return "recbole"
    if first.count("\t") == 3:
        return "ml-100k"
    raise ValueError(f"{path}: cannot tell the MovieLens format; pass --format")


def _read_plain(path: str, delimiter: str, columns: list[str]) -> pa.Table:
    opts = pcsv.ReadOptions(column_names=columns)
    conv = pcsv.ConvertOptions(column_types={"user": pa.string(), "item": pa.string()})  # ids are tokens
    parse = pcsv.ParseOptions(delimiter=delimiter, quote_char=False)
    return pcsv.read_csv(path, read_options=opts, parse_options=parse, convert_options=conv)


def read_ratings(path: str, fmt: str) -> pa.Table:
    """(user string, item string, rating float, seconds float) in file order."""
    if fmt == "ml-100k":
        t = _read_plain(path, "\t", ["user", "item", "rating", "seconds"])
    elif fmt == "ml-1m":
        # '::' is two one-character delimiters with an empty field between: keep the even columns.
        t = _read_plain(path, ":", ML1M_COLUMNS).drop_columns(ML1M_EMPTY)
    elif fmt == "ml-latest":
        conv = pcsv.ConvertOptions(column_types={"userId": pa.string(), "movieId": pa.string()})
        raw = pcsv.read_csv(path, convert_options=conv)
        if ",".join(raw.column_names) != LATEST_HEADER:
            raise ValueError(f"{path}: expected the header {LATEST_HEADER}, got {','.join(raw.column_names)}")
        t = pa.table({"user": raw.column("userId"), "item": raw.column("movieId"), "rating": raw.column("rating"),
                      "seconds": raw.column("timestamp")})
    elif fmt == "recbole":
        parse = pcsv.ParseOptions(delimiter="\t", quote_char=False)
        fields = recbole_header(path)
        for need in ("user_id", "item_id", "timestamp"):
            if need not in fields:
                raise ValueError(f"{path}: RecBole header has no '{need}:...' field (header: {list(fields.values())})")
        conv = pcsv.ConvertOptions(column_types={fields["user_id"]: pa.string(), fields["item_id"]: pa.string()})
        raw = pcsv.read_csv(path, parse_options=parse, convert_options=conv)
        cols = {"user": fields["user_id"], "item": fields["item_id"], "seconds": fields["timestamp"]}
        if "rating" in fields:
            cols["rating"] = fields["rating"]
        t = pa.table({k: raw.column(v) for k, v in cols.items()})
    else:
        raise ValueError(f"unknown MovieLens format {fmt!r}")
    if t.column("seconds").null_count or t.column("user").null_count or t.column("item").null_count:
        raise ValueError(f"{path}: rows with an empty user, item or timestamp")
    return t


def dense_ids(tokens: pa.ChunkedArray) -> tuple[np.ndarray, pa.Table]:
    """Tokens -> ids 1..n (sorted numerically when all are integers, else as strings) and the map table."""
    uniq = pc.unique(tokens)
    try:
        keys = uniq.cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        keys = uniq
    order = pc.sort_indices(keys).to_numpy()
    sorted_tokens = uniq.take(pa.array(order))
    ids = pc.index_in(tokens, value_set=sorted_tokens).to_numpy(zero_copy_only=False).astype(np.int64) + 1
    mapping = pa.table({"id": pa.array(np.arange(1, len(order) + 1), pa.int64()), "original": sorted_tokens})
    return ids, mapping


def convert(path: PathLike, out_dir: PathLike, fmt: Format = "auto") -> dict:
    """Write the log (day partitions), `_maps/` and `_movielens.json`; returns a summary."""
    path, out_dir = os.fspath(path), os.fspath(out_dir)
    if os.path.isdir(out_dir) and any(not n.startswith((".", "_")) for n in os.listdir(out_dir)):
        raise ValueError(f"{out_dir} already holds data; convert into an empty directory")
    fmt = detect_format(path) if fmt == "auto" else fmt
    t = read_ratings(path, fmt)
    user, user_map = dense_ids(t.column("user"))
    item, item_map = dense_ids(t.column("item"))
    ts = ts_from_seconds(t.column("seconds").cast(pa.float64()).to_numpy())
    cols = {USER: pa.array(user), ITEM: pa.array(item), TS: ts}
    if "rating" in t.column_names:
        cols["rating"] = t.column("rating").cast(pa.float32())
    events = pa.table(cols).sort_by([(USER, "ascending"), (TS, "ascending"), (ITEM, "ascending")])
    day = pc.cast(events.column(TS), pa.int64()).to_numpy() // DAY_US
    os.makedirs(os.path.join(out_dir, "_maps"), exist_ok=True)
    pq.write_table(user_map.rename_columns([USER, "original"]), os.path.join(out_dir, "_maps", "user_map.parquet"))
    pq.write_table(item_map.rename_columns([ITEM, "original"]), os.path.join(out_dir, "_maps", "item_map.parquet"))
    by_day = np.argsort(day, kind="stable")
    days, starts = np.unique(day[by_day], return_index=True)
    for d, a, b in zip(days, starts, [*starts[1:], len(by_day)]):
        name = f"day={(EPOCH + dt.timedelta(days=int(d))).isoformat()}"
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        pq.write_table(events.take(pa.array(by_day[a:b])), os.path.join(out_dir, name, "part-00000.parquet"))
    summary = {
        "source": os.path.abspath(path),
        "format": fmt,
        "events": events.num_rows,
        "users": user_map.num_rows,
        "items": item_map.num_rows,
        "first_day": (EPOCH + dt.timedelta(days=int(days[0]))).isoformat(),
        "last_day": (EPOCH + dt.timedelta(days=int(days[-1]))).isoformat(),
    }
    with open(os.path.join(out_dir, "_movielens.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="u.data, ratings.dat, ratings.csv or a RecBole .inter file")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="auto", choices=["auto", "ml-100k", "ml-1m", "ml-latest", "recbole"])
    a = p.parse_args(argv)
    try:
        print(json.dumps(convert(a.path, a.out, a.format)))
    except (ValueError, OSError, pa.ArrowInvalid) as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
