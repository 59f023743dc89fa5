"""Sequence building: the tie rule, day windows, and the Ray Data and arrow back ends producing the same rows."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from data import ray_utils
from data.config import SynthConfig
from data.schema import LogError
from data.sequences import build_sequences, read_sequences
from data.synth import generate
from tests.helpers import events_table, write_log

EVENTS = [
    (2, 30, "2026-01-02 10:00:00"),
    (1, 11, "2026-01-01 09:00:00"),
    (1, 12, "2026-01-02 00:00:00"),
    (1, 10, "2026-01-01 08:00:00"),
    (2, 31, "2026-01-01 23:59:59"),
    # the same instant twice: the smaller item id first, whatever the file order
    (3, 42, "2026-01-03 12:00:00"),
    (3, 41, "2026-01-03 12:00:00"),
]


def test_rows_are_users_in_time_order_with_the_tie_rule(tmp_path):
    write_log(tmp_path / "log", EVENTS)
    stats = build_sequences(tmp_path / "log", tmp_path / "seq", backend="arrow")
    seqs = read_sequences(tmp_path / "seq")
    assert (stats.num_users, stats.num_events) == (3, 7)
    assert seqs.column("user_id").to_pylist() == [1, 2, 3]
    assert seqs.column("item_ids").to_pylist() == [[10, 11, 12], [31, 30], [41, 42]]
    ts = seqs.column("ts").to_pylist()
    assert [t.isoformat() for t in ts[0]] == ["2026-01-01T08:00:00+00:00", "2026-01-01T09:00:00+00:00",
                                              "2026-01-02T00:00:00+00:00"]


def test_day_window_is_start_inclusive_cutoff_exclusive(tmp_path):
    write_log(tmp_path / "log", EVENTS)
    build_sequences(tmp_path / "log", tmp_path / "seq", cutoff_day="2026-01-02", backend="arrow")
    assert read_sequences(tmp_path / "seq").column("item_ids").to_pylist() == [[10, 11], [31]]
    build_sequences(tmp_path / "log", tmp_path / "seq", "2026-01-03", backend="arrow", start_day="2026-01-02",
                    overwrite=True)
    assert read_sequences(tmp_path / "seq").column("item_ids").to_pylist() == [[12], [30]]
    with pytest.raises(LogError, match="no day partitions"):
        build_sequences(tmp_path / "log", tmp_path / "empty", cutoff_day="2025-12-01", backend="arrow")
    with pytest.raises(ValueError, match="not empty"):
        build_sequences(tmp_path / "log", tmp_path / "seq", backend="arrow")


@pytest.fixture(scope="module")
def synth_log(tmp_path_factory):
    cfg = SynthConfig(users=600, items=300, days=3, seed=1, events_per_user=40, users_per_chunk=200, workers=1)
    log = generate(cfg, tmp_path_factory.mktemp("seqsynth") / "log")
    # A second file on the first day with one bad row among many: skipped and counted by both back ends.
    rows = [(10_000 + u, 1 + u % 7, "2026-01-01 05:00:00") for u in range(1, 3001)]
    rows[17] = (10_017, -4, "2026-01-01 05:00:00")
    t = events_table(rows, extra={"src": pa.array([0] * len(rows), pa.int8())})
    pq.write_table(t, os.path.join(log, "day=2026-01-01", "part-extra.parquet"))
    # Same-instant events in different files, so that file order cannot decide their order.
    write_log(log, [(5, 9, "2026-01-02 07:00:00")], part="part-tie-b.parquet")
    write_log(log, [(5, 8, "2026-01-02 07:00:00")], part="part-tie-a.parquet")
    return log


@pytest.mark.slow
@pytest.mark.parametrize("shuffle", ["sort", "hash"])
def test_ray_and_arrow_back_ends_agree(synth_log, tmp_path, ray_local, monkeypatch, shuffle):
    if shuffle == "hash":  # the strategy used for large logs
        monkeypatch.setattr(ray_utils, "MAX_SORT_SHUFFLE_OBJECTS", 0)
        # one aggregator actor for all partitions: each actor is a new process (seconds to start here)
        monkeypatch.setattr(ray.data.DataContext.get_current(), "max_hash_shuffle_aggregators", 1)
    progress = {"arrow": [], "ray": []}
    a = build_sequences(synth_log, tmp_path / "arrow", backend="arrow", rows_per_bucket=7000,
                        on_events=lambda *x: progress["arrow"].append(x))
    r = build_sequences(synth_log, tmp_path / "ray", backend="ray", rows_per_bucket=7000,  # several buckets
                        on_events=lambda *x: progress["ray"].append(x))
    for calls in progress.values():  # events read, of the footers' total: rising to every row, bad ones too
        assert calls and calls[-1][0] == calls[-1][1] == a.num_events + 1, calls
        assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert len(os.listdir(tmp_path / "arrow")) > 1 and len(os.listdir(tmp_path / "ray")) > 1
    ta, tr = read_sequences(tmp_path / "arrow"), read_sequences(tmp_path / "ray")
    # 600 synthetic users + 3000 extra users, less user 10017 whose only event was the bad row
    assert ta.num_rows == 3599 and tr.num_rows == ta.num_rows
    for col in ("user_id", "item_ids", "ts"):
        assert tr.column(col).to_pylist() == ta.column(col).to_pylist(), col
    assert (a.num_users, a.num_events) == (r.num_users, r.num_events)
    assert a.skipped.by_reason == r.skipped.by_reason == {"item_id <= 0 (0 is padding)": 1}
    assert list(r.skipped.by_file) == [os.path.join(synth_log, "day=2026-01-01", "part-extra.parquet")]
    items, stamps = ta.column("item_ids")[4].as_py(), ta.column("ts")[4].as_py()
    tied = [i for i, t in zip(items, stamps) if t.isoformat() == "2026-01-02T07:00:00+00:00"]
    assert tied == [8, 9]  # same instant, two files: the item id decides


def test_ray_back_end_raises_the_log_error(tmp_path, ray_local):
    write_log(tmp_path / "log", EVENTS)
    pq.write_table(events_table(EVENTS[:1]).drop_columns(["ts"]),
                   os.path.join(tmp_path / "log", "day=2026-01-02", "part-zz.parquet"))
    with pytest.raises(LogError, match="missing column 'ts'") as e:
        build_sequences(tmp_path / "log", tmp_path / "seq", backend="ray")
    assert e.value.path.endswith("part-zz.parquet")


def test_a_log_whose_rows_are_all_skipped_gives_no_sequences(tmp_path):
    write_log(tmp_path / "log", [(1, 0, "2026-01-01 10:00:00")])  # item 0: skipped
    stats = build_sequences(tmp_path / "log", tmp_path / "seq", backend="arrow", max_bad_fraction=1.0)
    assert (stats.num_users, stats.num_events, stats.skipped.rows_skipped) == (0, 0, 1)
    assert read_sequences(tmp_path / "seq").num_rows == 0
