"""The validating log reader: one test per bad input, and what is skipped (and counted) vs what stops."""

import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.schema import LogError, SkipReport, list_files, require_day
from tests.helpers import events_table, iter_log, ts, write_log

GOOD = [(1, 10, "2026-01-01 08:00:00"), (1, 11, "2026-01-01 09:00:00"), (2, 12, "2026-01-02 10:00:00")]


def _read(log_dir, **kw) -> pa.Table:
    return pa.concat_tables(list(iter_log(log_dir, **kw)))


def _write_day(log_dir, day: str, table: pa.Table, name: str = "part-00000.parquet") -> str:
    path = os.path.join(log_dir, f"day={day}")
    os.makedirs(path, exist_ok=True)
    pq.write_table(table, os.path.join(path, name))
    return os.path.join(path, name)


def test_good_log_reads_all_rows_with_extra_columns(tmp_path):
    t = events_table(GOOD[:2], extra={"event": pa.array(["click", "buy"])})
    _write_day(tmp_path, "2026-01-01", t)
    out = _read(tmp_path)
    assert out.num_rows == 2 and out.column("event").to_pylist() == ["click", "buy"]


def test_narrow_ints_and_ns_timestamps_are_normalised(tmp_path):
    t = pa.table({
        "user_id": pa.array([1], pa.int32()),
        "item_id": pa.array([7], pa.uint16()),
        "ts": pa.array([ts("2026-01-01 00:00:01") * 1000], pa.timestamp("ns", tz="UTC")),
    })
    _write_day(tmp_path, "2026-01-01", t)
    out = _read(tmp_path)
    assert out.schema.field("user_id").type == pa.int64() and out.schema.field("item_id").type == pa.int64()
    assert out.schema.field("ts").type == pa.timestamp("us", tz="UTC")


def test_missing_column(tmp_path):
    path = _write_day(tmp_path, "2026-01-01", events_table(GOOD[:1]).drop_columns(["item_id"]))
    with pytest.raises(LogError, match="missing column 'item_id'") as e:
        _read(tmp_path)
    assert e.value.path == path


def test_wrong_column_type(tmp_path):
    t = events_table(GOOD[:1]).set_column(1, "item_id", pa.array(["10"]))
    path = _write_day(tmp_path, "2026-01-01", t)
    with pytest.raises(LogError, match="column 'item_id' has type string") as e:
        _read(tmp_path)
    assert e.value.path == path


def test_timestamp_without_utc(tmp_path):
    t = events_table(GOOD[:1])
    t = t.set_column(2, "ts", t.column("ts").cast(pa.timestamp("us")))
    _write_day(tmp_path, "2026-01-01", t)
    with pytest.raises(LogError, match="must be in UTC"):
        _read(tmp_path)


def test_not_parquet(tmp_path):
    os.makedirs(tmp_path / "day=2026-01-01")
    path = tmp_path / "day=2026-01-01" / "part-0.parquet"
    path.write_text("user_id,item_id,ts\n1,2,3\n")
    with pytest.raises(LogError, match="not a readable Parquet file") as e:
        _read(tmp_path)
    assert e.value.path == str(path)


def test_truncated_parquet(tmp_path):
    path = _write_day(tmp_path, "2026-01-01", events_table(GOOD[:2]))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(LogError, match="not a readable Parquet file"):
        _read(tmp_path)


def test_negative_ids_stop_the_job_beyond_the_allowed_fraction(tmp_path):
    path = _write_day(tmp_path, "2026-01-01", events_table([(-5, 10, "2026-01-01 08:00:00"), *GOOD[:2]]))
    with pytest.raises(LogError, match="1 negative user_id") as e:
        _read(tmp_path, max_bad_fraction=0.0)
    assert e.value.path == path and "data.max_bad_fraction" in str(e.value)


def test_item_zero_is_reserved_for_padding(tmp_path):
    _write_day(tmp_path, "2026-01-01", events_table([(1, 0, "2026-01-01 08:00:00")]))
    with pytest.raises(LogError, match="item_id <= 0"):
        _read(tmp_path)


def test_timestamp_outside_its_day_partition(tmp_path):
    # an event of Jan 2nd stored under day=2026-01-01
    path = _write_day(tmp_path, "2026-01-01", events_table([(1, 10, "2026-01-02 00:00:00")]))
    with pytest.raises(LogError, match="ts outside its day partition") as e:
        _read(tmp_path)
    assert e.value.path == path and "day=2026-01-01" in str(e.value)


def test_null_values(tmp_path):
    t = events_table(GOOD[:2])
    t = t.set_column(1, "item_id", pa.array([10, None], pa.int64()))
    _write_day(tmp_path, "2026-01-01", t)
    with pytest.raises(LogError, match="1 null value"):
        _read(tmp_path, max_bad_fraction=0.0)


def test_few_bad_rows_are_skipped_counted_and_warned(tmp_path, caplog):
    rows = [(u, 1 + u % 50, "2026-01-01 12:00:00") for u in range(1, 2001)]
    rows[5] = (-1, 3, "2026-01-01 12:00:00")
    rows[9] = (4, -2, "2026-01-01 12:00:00")
    rows[11] = (4, 2, "2026-01-03 12:00:00")  # written under day=2026-01-01 below
    path = _write_day(tmp_path, "2026-01-01", events_table(rows))
    report = SkipReport()
    out = _read(tmp_path, max_bad_fraction=0.002, report=report)
    assert out.num_rows == 1997
    assert report.rows_read == 2000 and report.rows_skipped == 3
    assert report.by_reason == {"negative user_id": 1, "item_id <= 0 (0 is padding)": 1,
                                "ts outside its day partition": 1}
    with caplog.at_level(logging.WARNING, logger="data.schema"):
        report.warn()
    assert path in caplog.text and "skipped 3 bad rows" in caplog.text


def test_bad_partition_directory_name(tmp_path):
    os.makedirs(tmp_path / "2026-01-01")
    with pytest.raises(LogError, match="day=YYYY-MM-DD"):
        list_files(tmp_path)
    os.rename(tmp_path / "2026-01-01", tmp_path / "day=2026-02-30")
    with pytest.raises(LogError, match="impossible date"):
        list_files(tmp_path)


def test_hidden_entries_are_not_data(tmp_path):
    write_log(tmp_path, GOOD)
    (tmp_path / "_synth.json").write_text("{}")
    (tmp_path / "day=2026-01-01" / "_SUCCESS").write_text("")
    assert [f.day.isoformat() for f in list_files(tmp_path)] == ["2026-01-01", "2026-01-02"]
    assert [f.day.isoformat() for f in list_files(tmp_path, "2026-01-02")] == ["2026-01-02"]


def test_empty_eval_day_names_the_day(tmp_path):
    write_log(tmp_path, GOOD)
    with pytest.raises(LogError, match="no events on evaluation day 2026-01-05") as e:
        require_day(tmp_path, "2026-01-05")
    assert e.value.path.endswith("day=2026-01-05")
    _write_day(tmp_path, "2026-01-03", events_table(GOOD).slice(0, 0))  # partition with a 0-row file
    with pytest.raises(LogError, match="2026-01-03"):
        require_day(tmp_path, "2026-01-03")
    require_day(tmp_path, "2026-01-02")


def test_log_error_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(LogError("/x/y.parquet", "missing column 'ts'")))
    assert isinstance(e, ValueError) and str(e) == "/x/y.parquet: missing column 'ts'"
    assert np.array_equal([e.path], ["/x/y.parquet"])
