"""data.ts_unit: a log whose `ts` column holds integers since the epoch (s, ms, us, ns) reads exactly like the
same log written with timestamp[us, UTC], through every reader and the one-call preparation."""

import os
import typing

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.config import DataConfig
from data.ingest import Source, ingest
from data.prepare import prepare
from data.schema import TS_TYPE, TS_UNITS, LogError, SkipReport, day_dir, day_start_us, iter_file, list_files
from data.sequences import build_sequences, read_sequences
from data.split import read_queries
from data.stats import item_counts, num_items
from data.vocab import build_vocabulary, id_types
from tests.helpers import ROOT, iter_log
from trainer.config import load_config

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]
# (user, item, day index, tick): tick t is t time units after the day's midnight (units of the log's ts_unit),
# listed out of time order, with a same-instant pair (user 1, ticks 5) that the tie rule orders by item.
EVENTS = [
    (1, 4, 0, 7), (1, 3, 0, 5), (1, 2, 0, 5), (2, 5, 0, 1), (2, 1, 0, 900),
    (1, 6, 1, 3), (2, 2, 1, 2), (3, 7, 1, 4), (3, 1, 1, 999),
    (1, 1, 2, 1), (2, 3, 2, 8), (2, 4, 2, 6), (3, 5, 2, 2), (4, 6, 2, 3),
]
US_PER = {"s": 1_000_000, "ms": 1_000, "us": 1}
NS_EXTRA = 789  # ns logs: a sub-microsecond part, truncated by the reader


def _ids(kind: str) -> tuple:
    if kind == "string":
        return (lambda u: f"user-{u}"), (lambda i: f"sku-{i}")
    return (lambda u: u), (lambda i: i)


def _write(log_dir, unit: str, kind: str = "dense", events=EVENTS) -> dict:
    """The events as a log with integer `ts` in `unit`, a tick being one unit (one us for ns logs)."""
    return _write_ticks(log_dir, unit, unit, kind, events)


def _write_ticks(log_dir, unit, tick_unit: str, kind: str = "dense", events=EVENTS) -> dict:
    """The events as a log, a tick being one `tick_unit` (one us for "ns"): `ts` as integers in `unit`, or
    (unit=None) as timestamp[us, UTC], the reference. Returns {path: day}."""
    user, item = _ids(kind)
    files = {}
    for d, day in enumerate(DAYS):
        rows = [e for e in events if e[2] == d]
        if not rows:
            continue
        us = [day_start_us(day) + tick * US_PER.get(tick_unit, 1) for _, _, _, tick in rows]
        if unit is None:
            ts = pa.array(us, pa.int64()).cast(TS_TYPE)  # the reference: what the integers mean, in microseconds
        elif unit == "ns":
            ts = pa.array([v * 1000 + NS_EXTRA for v in us], pa.int64())
        else:
            ts = pa.array([v // US_PER[unit] for v in us], pa.int64())
        table = pa.table({"user_id": pa.array([user(r[0]) for r in rows]),
                          "item_id": pa.array([item(r[1]) for r in rows]), "ts": ts})
        os.makedirs(day_dir(log_dir, day), exist_ok=True)
        path = os.path.join(day_dir(log_dir, day), "part-00000.parquet")
        pq.write_table(table, path)
        files[path] = day
    return files


def _pair(tmp_path, unit: str, kind: str = "dense"):
    ref, ints = tmp_path / "ref", tmp_path / f"int-{unit}"
    _write_ticks(ref, None, unit, kind)
    _write(ints, unit, kind)
    return ref, ints


def _rows(log_dir, **kw) -> list:
    return pa.concat_tables(list(iter_log(log_dir, **kw))).to_pylist()


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_integer_ts_reads_exactly_like_timestamps(tmp_path, unit):
    ref, ints = _pair(tmp_path, unit)
    assert pq.read_schema(next(iter(list_files(ints))).path).field("ts").type == pa.int64()
    expected = _rows(ref)
    assert _rows(ints, ts_unit=unit) == expected
    assert pa.concat_tables(list(iter_log(ints, ts_unit=unit))).schema.field("ts").type == TS_TYPE
    a = build_sequences(ref, tmp_path / "seq-ref", backend="arrow")
    b = build_sequences(ints, tmp_path / "seq-int", backend="arrow", ts_unit=unit)
    assert read_sequences(b.out_dir).to_pylist() == read_sequences(a.out_dir).to_pylist()
    assert (b.num_users, b.num_events) == (a.num_users, a.num_events) == (4, len(EVENTS))
    user1 = read_sequences(b.out_dir).to_pylist()[0]
    assert user1["item_ids"] == [2, 3, 4, 6, 1]  # time order, the same-instant pair by item id
    np.testing.assert_array_equal(item_counts(ints, DAYS[:2], 7, ts_unit=unit), item_counts(ref, DAYS[:2], 7))
    assert num_items(ints, ts_unit=unit) == num_items(ref) == 7


@pytest.mark.parametrize("kind", ["dense", "string"])
@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_prepare_passes_the_unit_to_every_reader(tmp_path, unit, kind):
    """The one-call preparation (vocabulary for string ids, sequences, held-out split, item counts) gives the
    same data for the integer log as for the reference; the reference, a timestamp log, reads the same under
    data.ts_unit=unit (timestamp columns are accepted under any unit)."""
    ref, ints = _pair(tmp_path, unit, kind)
    a = prepare(DataConfig(path=str(ref), backend="arrow"), tmp_path / "work-ref", query_len=3)
    b = prepare(DataConfig(path=str(ints), backend="arrow", ts_unit=unit), tmp_path / "work-int", query_len=3)
    c = prepare(DataConfig(path=str(ref), backend="arrow", ts_unit=unit), tmp_path / "work-ref2", query_len=3)
    for p in (b, c):
        assert read_sequences(p.sequences).to_pylist() == read_sequences(a.sequences).to_pylist()
        assert read_sequences(p.train_sequences).to_pylist() == read_sequences(a.train_sequences).to_pylist()
        assert read_queries(p.eval_queries).to_pylist() == read_queries(a.eval_queries).to_pylist()
        np.testing.assert_array_equal(np.load(p.item_counts), np.load(a.item_counts))
        assert (p.num_items, p.eval_day, p.vocab_summary) == (a.num_items, a.eval_day, a.vocab_summary)
    assert a.eval_day == DAYS[-1] and a.num_eval_queries == 3  # users 1, 2, 3 (user 4 has no history)
    assert (a.vocab is not None) == (kind == "string")


def test_ray_back_end_reads_integer_ts(tmp_path, ray_local):
    """Ray Data read tasks (sequences) and the vocabulary's Ray count get the unit too."""
    ref, ints = _pair(tmp_path, "ms", "string")
    a = build_sequences(ref, tmp_path / "seq-ref", backend="arrow", ids=build_vocabulary(
        ref, None, DataConfig().vocab, backend="arrow").id_map())
    vocab = build_vocabulary(ints, None, DataConfig().vocab, backend="ray", ts_unit="ms")
    b = build_sequences(ints, tmp_path / "seq-ray", backend="ray", ids=vocab.id_map(), ts_unit="ms")
    assert read_sequences(b.out_dir).to_pylist() == read_sequences(a.out_dir).to_pylist()


def test_integer_ts_without_a_unit_is_one_line_naming_the_file(tmp_path):
    files = _write(tmp_path / "log", "ms")
    first = sorted(files)[0]
    for read in (lambda: _rows(tmp_path / "log"),
                 lambda: id_types(tmp_path / "log"),
                 lambda: prepare(DataConfig(path=str(tmp_path / "log"), backend="arrow"), tmp_path / "w", 3)):
        with pytest.raises(LogError, match=r"column 'ts' has type int64, expected timestamp with tz=UTC; .*"
                                           r"set data\.ts_unit=s\|ms\|us\|ns") as e:
            read()
        assert e.value.path == first and "\n" not in str(e.value)


def test_other_ts_types_are_still_refused_under_a_unit(tmp_path):
    path = os.path.join(day_dir(tmp_path, DAYS[0]), "part-00000.parquet")
    os.makedirs(os.path.dirname(path))
    pq.write_table(pa.table({"user_id": [1], "item_id": [2], "ts": pa.array([1.7e9])}), path)
    with pytest.raises(LogError, match=r"column 'ts' has type double, expected timestamp with tz=UTC or "
                                       r"integers \(data\.ts_unit=s\)") as e:
        _rows(tmp_path, ts_unit="s")
    assert e.value.path == path


def test_bad_ts_unit_is_a_value_error_naming_data_ts_unit(tmp_path):
    assert typing.get_args(typing.get_type_hints(DataConfig)["ts_unit"]) == TS_UNITS
    with pytest.raises(ValueError, match=r"^data\.ts_unit must be .*, got 'minutes'$"):
        DataConfig(ts_unit="minutes")
    with pytest.raises(ValueError, match=r"data\.ts_unit='minutes'"):
        load_config(ROOT / "configs" / "smoke.yaml", ["data.ts_unit=minutes"])
    assert load_config(ROOT / "configs" / "smoke.yaml", ["data.ts_unit=ms"]).data.ts_unit == "ms"
    assert DataConfig().ts_unit == "timestamp"
    _write(tmp_path / "log", "ms")
    with pytest.raises(ValueError, match="ts_unit must be one of timestamp, s, ms, us, ns, got 'minutes'"):
        _rows(tmp_path / "log", ts_unit="minutes")


@pytest.mark.parametrize("unit, value, dtype", [
    ("s", 2**62, pa.int64()), ("ms", -(2**62), pa.int64()), ("s", 2**63 + 5, pa.uint64()),
])
def test_a_value_beyond_timestamp_us_is_a_log_error(tmp_path, unit, value, dtype):
    path = os.path.join(day_dir(tmp_path, DAYS[0]), "part-00000.parquet")
    os.makedirs(os.path.dirname(path))
    good = day_start_us(DAYS[0]) // US_PER[unit]
    pq.write_table(pa.table({"user_id": [1, 1], "item_id": [2, 3], "ts": pa.array([good, value], dtype)}), path)
    with pytest.raises(LogError, match=rf"column 'ts' has value {value}\b") as e:
        _rows(tmp_path, ts_unit=unit, max_bad_fraction=1.0)  # an error, not a skipped row
    assert e.value.path == path and "\n" not in str(e.value)


def test_ns_never_overflow_and_are_truncated_like_timestamp_ns(tmp_path):
    path = os.path.join(day_dir(tmp_path, DAYS[0]), "part-00000.parquet")
    os.makedirs(os.path.dirname(path))
    ns = [day_start_us(DAYS[0]) * 1000 + 1999, 2**63 - 1]
    pq.write_table(pa.table({"user_id": [1, 1], "item_id": [2, 3], "ts": pa.array(ns, pa.int64())}), path)
    report = SkipReport()
    rows = _rows(tmp_path, ts_unit="ns", max_bad_fraction=1.0, report=report)
    as_ts = pa.array(ns[:1], pa.timestamp("ns", tz="UTC")).cast(TS_TYPE, safe=False).to_pylist()
    assert [r["ts"] for r in rows] == as_ts and as_ts[0].microsecond == 1
    assert dict(report.by_reason) == {"ts outside its day partition": 1}


@pytest.mark.parametrize("unit", ["s", "ns"])
def test_integer_ts_outside_its_day_is_skipped_like_a_timestamp(tmp_path, unit):
    """Ticks at the day's midnight (inside), at the next midnight and a day early (outside): the same rows are
    kept and the same counts reported for the integer log and the timestamp one."""
    ticks_per_day = 86_400 if unit == "s" else 86_400_000_000
    events = [(1, 2, 0, 0), (1, 3, 0, ticks_per_day), (2, 4, 0, -1), (2, 5, 0, ticks_per_day - 1)]
    _write_ticks(tmp_path / "ref", None, "us" if unit == "ns" else unit, events=events)
    files = _write_ticks(tmp_path / "int", unit, "us" if unit == "ns" else unit, events=events)
    reports = SkipReport(), SkipReport()
    ref = _rows(tmp_path / "ref", max_bad_fraction=0.5, report=reports[0])
    ints = _rows(tmp_path / "int", max_bad_fraction=0.5, report=reports[1], ts_unit=unit)
    assert ints == ref and [r["item_id"] for r in ints] == [2, 5]
    assert dict(reports[1].by_reason) == dict(reports[0].by_reason) == {"ts outside its day partition": 2}
    assert set(reports[1].by_file) == set(files) and reports[1].rows_read == 4
    f = list_files(tmp_path / "int")[0]
    with pytest.raises(LogError, match=r"bad rows \(2 ts outside its day partition\) exceed data.max_bad_fraction"):
        list(iter_file(f, max_bad_fraction=0.0, report=SkipReport(), ts_unit=unit))


def test_ingest_converts_with_the_same_function(tmp_path):
    """The importer's integer epoch numbers go through the reader's conversion: exact, and out-of-range values
    are one line naming the file, the column and the value."""
    csv = tmp_path / "e.csv"
    csv.write_text("uid,sku,t\n1,2,1767225600123\n1,3,1767225600124\n")
    ingest([csv], tmp_path / "log", Source("csv", "uid", "sku", "t", "ms"))
    assert [r["ts"] for r in _rows(tmp_path / "log", raw_ids=True)] == \
        pa.array([1767225600123, 1767225600124], pa.timestamp("ms", tz="UTC")).cast(TS_TYPE).to_pylist()
    bad = tmp_path / "bad.csv"
    bad.write_text(f"uid,sku,t\n1,2,{2**62}\n")
    with pytest.raises(LogError, match=rf"column 't' has value {2**62} \(s since 1970-01-01\)") as e:
        ingest([bad], tmp_path / "log2", Source("csv", "uid", "sku", "t", "s"))
    assert e.value.path == str(bad)
