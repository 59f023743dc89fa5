"""Held-out-day and leave-one-out splits: edge cases on hand-written logs."""

import datetime as dt

import pytest

from data.schema import LogError
from data.sequences import build_sequences, read_sequences
from data.split import held_out_day_split, leave_one_out, prepare_held_out, read_queries
from tests.helpers import write_log

D = "2026-01-05"
EVENTS = [
    # user 1: history on three days, two events on D
    (1, 11, "2026-01-01 10:00:00"), (1, 12, "2026-01-03 10:00:00"), (1, 13, "2026-01-04 23:59:59"),
    (1, 11, "2026-01-04 23:00:00"), (1, 14, "2026-01-05 08:00:00"), (1, 15, "2026-01-05 09:00:00"),
    # user 2: only on day D -> no history, not evaluated, no training data
    (2, 21, "2026-01-05 01:00:00"), (2, 22, "2026-01-05 02:00:00"),
    # user 3: absent on D -> training only
    (3, 31, "2026-01-02 10:00:00"), (3, 32, "2026-01-04 10:00:00"),
    # user 4: two events at exactly midnight starting D (a tie: smaller id first) and one just before
    (4, 43, "2026-01-04 23:59:59"), (4, 42, "2026-01-05 00:00:00"), (4, 41, "2026-01-05 00:00:00"),
    # user 5: events after D are not part of this split
    (5, 51, "2026-01-03 10:00:00"), (5, 52, "2026-01-05 10:00:00"), (5, 53, "2026-01-06 10:00:00"),
]


@pytest.fixture()
def seq_dir(tmp_path):
    write_log(tmp_path / "log", EVENTS)
    build_sequences(tmp_path / "log", tmp_path / "seq", cutoff_day="2026-01-06", backend="arrow")
    return tmp_path / "seq"


def test_held_out_day_queries_and_training_rows(seq_dir, tmp_path):
    res = held_out_day_split(seq_dir, tmp_path / "split", D, query_len=2)
    q = read_queries(res.queries["eval"]).to_pylist()
    assert [r["user_id"] for r in q] == [1, 4, 5]  # 2: nothing before D; 3: nothing on D
    u1, u4, u5 = q
    assert u1["history"] == [11, 13] and u1["target"] == 14 and u1["day_items"] == [14, 15]
    assert u1["seen_items"] == [11, 12, 13] and u1["n_history"] == 4
    assert u4["history"] == [43] and u4["target"] == 41 and u4["day_items"] == [41, 42]  # midnight is D, tie by id
    assert u5["day_items"] == [52]  # the event of the next day is not in the day's items
    train = read_sequences(res.train_sequences)
    assert train.column("user_id").to_pylist() == [1, 3, 4, 5]
    assert train.column("item_ids").to_pylist() == [[11, 12, 11, 13], [31, 32], [43], [51]]
    assert res.num_queries == {"eval": 3} and res.num_train_users == 4


def test_training_window_and_min_history(seq_dir, tmp_path):
    res = held_out_day_split(seq_dir, tmp_path / "split", D, query_len=10, train_days=2, min_history=2)
    train = read_sequences(res.train_sequences)
    # days D-2 and D-1 only: 2026-01-03 and 2026-01-04
    assert train.column("item_ids").to_pylist() == [[12, 11, 13], [32], [43], [51]]
    q = read_queries(res.queries["eval"]).to_pylist()
    assert [r["user_id"] for r in q] == [1]  # users 4 and 5 have one event before D
    assert q[0]["history"] == [11, 12, 11, 13]  # queries use all history, not only the training window


def test_split_is_a_pure_function_of_the_dates(seq_dir, tmp_path, ray_local):
    a = held_out_day_split(seq_dir, tmp_path / "a", dt.date(2026, 1, 5), query_len=3)
    b = held_out_day_split(seq_dir, tmp_path / "b", D, query_len=3, backend="ray")
    assert read_queries(a.queries["eval"]).equals(read_queries(b.queries["eval"]))
    assert read_sequences(a.train_sequences).to_pylist() == read_sequences(b.train_sequences).to_pylist()


def test_day_without_eligible_users_is_an_error_naming_it(seq_dir, tmp_path):
    with pytest.raises(LogError, match="no evaluation users on day 2026-01-02"):
        held_out_day_split(seq_dir, tmp_path / "split", "2026-01-02", query_len=5)


def test_prepare_held_out_checks_the_eval_day(tmp_path):
    write_log(tmp_path / "log", EVENTS)
    with pytest.raises(LogError, match="no events on evaluation day 2026-01-09"):
        prepare_held_out(tmp_path / "log", tmp_path / "work", 5, eval_day="2026-01-09", backend="arrow")
    res = prepare_held_out(tmp_path / "log", tmp_path / "work", 5, backend="arrow")  # the last day: 2026-01-06
    assert read_queries(res.queries["eval"]).column("target").to_pylist() == [53]


def test_leave_one_out(tmp_path):
    write_log(tmp_path / "log", EVENTS)
    build_sequences(tmp_path / "log", tmp_path / "seq", backend="arrow")  # every day
    res = leave_one_out(tmp_path / "seq", tmp_path / "loo", query_len=2)
    test, valid = read_queries(res.queries["test"]), read_queries(res.queries["valid"])
    assert test.column("user_id").to_pylist() == [1, 4, 5]  # users with >= 3 events
    assert test.column("target").to_pylist() == [15, 42, 53]
    assert test.column("history").to_pylist() == [[13, 14], [43, 41], [51, 52]]
    assert valid.column("target").to_pylist() == [14, 41, 52]
    assert valid.column("history").to_pylist() == [[11, 13], [43], [51]]
    assert valid.column("seen_items").to_pylist() == [[11, 12, 13], [43], [51]]
    train = read_sequences(res.train_sequences)
    assert train.column("item_ids").to_pylist() == [[11, 12, 11, 13], [21, 22], [31, 32], [43], [51]]
