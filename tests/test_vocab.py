"""The vocabulary stage: raw string and 64-bit ids -> dense rows, out-of-vocabulary items as misses."""

import datetime as dt
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.config import DataConfig, SynthConfig, VocabConfig
from data.oracle import oracle_metrics
from data.prepare import prepare
from data.schema import TS_TYPE, LogError, day_dir
from data.sequences import read_sequences
from data.split import read_queries
from data.synth import hashed_ids, unhashed_ids
from data.vocab import OOV_ITEM, Vocabulary, build_vocabulary, needs_vocabulary
from tests.helpers import ts
from trainer.evaluation.ranking import EvalBatch, PopularityScorer, rank_batch


def write_raw_log(log_dir, rows, part="part-0.parquet", item_type=pa.string(), user_type=pa.string()):
    """(user, item, 'YYYY-MM-DD HH:MM:SS') rows with raw ids, by day."""
    by_day: dict = {}
    for r in rows:
        by_day.setdefault(r[2][:10], []).append(r)
    for day, day_rows in by_day.items():
        os.makedirs(day_dir(log_dir, day), exist_ok=True)
        table = pa.table({
            "user_id": pa.array([r[0] for r in day_rows], user_type),
            "item_id": pa.array([r[1] for r in day_rows], item_type),
            "ts": pa.array([ts(r[2]) for r in day_rows], pa.int64()).cast(TS_TYPE),
        })
        pq.write_table(table, os.path.join(day_dir(log_dir, day), part))
    return str(log_dir)


# Training days 01-01 and 01-02; held-out day 01-03. Counts in the window: b 3, a 2, c 2, d 1.
ROWS = [
    ("u1", "a", "2026-01-01 00:00:01"), ("u1", "b", "2026-01-01 00:00:02"), ("u1", "c", "2026-01-02 00:00:01"),
    ("u2", "b", "2026-01-01 00:00:05"), ("u2", "c", "2026-01-02 00:00:02"), ("u2", "d", "2026-01-02 00:00:03"),
    ("u3", "b", "2026-01-02 00:00:04"), ("u3", "a", "2026-01-02 00:00:05"),
    ("u1", "new", "2026-01-03 00:00:01"),  # first seen on the held-out day: out of vocabulary
    ("u2", "a", "2026-01-03 00:00:02"),
    ("u3", "d", "2026-01-03 00:00:03"),
]
WINDOW = [dt.date(2026, 1, 1), dt.date(2026, 1, 2)]


@pytest.mark.parametrize("backend", ["arrow", "ray"])
def test_rows_by_count_then_raw_id_and_the_budgets(tmp_path, backend, request):
    if backend == "ray":
        request.getfixturevalue("ray_local")
    log = write_raw_log(tmp_path / "log", ROWS)
    v = build_vocabulary(log, WINDOW, VocabConfig(), backend=backend)
    assert v.items.column("raw_id").to_pylist() == ["b", "a", "c", "d"]  # ties (a, c: 2 each) by raw id
    assert v.items.column("row").to_pylist() == [1, 2, 3, 4]
    assert v.counts().tolist() == [0, 3, 2, 2, 1]
    assert v.users.column("raw_id").to_pylist() == ["u1", "u2", "u3"]  # every day, sorted
    rare = build_vocabulary(log, WINDOW, VocabConfig(min_count=2), backend=backend)
    assert rare.items.column("raw_id").to_pylist() == ["b", "a", "c"]
    assert (rare.dropped_items, rare.dropped_events) == (1, 1)
    top = build_vocabulary(log, WINDOW, VocabConfig(max_items=2), backend=backend)
    assert top.items.column("raw_id").to_pylist() == ["b", "a"] and top.dropped_items == 2
    saved = Vocabulary.load(v.save(tmp_path / "vocab"))
    assert saved.items.equals(v.items) and saved.users.equals(v.users)
    # the digest a checkpoint records: the same mapping gives the same one, another mapping another
    again = build_vocabulary(log, WINDOW, VocabConfig(), backend=backend).save(tmp_path / "again")
    assert Vocabulary.digest(again) == Vocabulary.digest(tmp_path / "vocab") is not None
    assert Vocabulary.digest(rare.save(tmp_path / "rare")) != Vocabulary.digest(again)
    m = v.id_map()
    assert m.items(pa.array(["d", "b", "zzz"])).to_pylist() == [4, 1, OOV_ITEM]
    assert m.users(pa.array(["u3", "u1"])).to_pylist() == [3, 1]


def test_held_out_split_drops_oov_events_and_keeps_oov_targets(tmp_path):
    write_raw_log(tmp_path / "log", ROWS)
    cfg = DataConfig(path=str(tmp_path / "log"), backend="arrow", vocab=VocabConfig(min_count=2))
    p = prepare(cfg, tmp_path / "work", query_len=5)
    assert p.vocab and p.num_items == 3 and p.vocab_summary["dropped_items"] == 1  # d is too rare
    train = read_sequences(p.train_sequences).to_pylist()
    # rows b=1, a=2, c=3; d (too rare) is gone from training sequences
    assert [r["item_ids"] for r in train] == [[2, 1, 3], [1, 3], [1, 2]]
    q = read_queries(p.eval_queries).to_pylist()
    assert [r["target"] for r in q] == [OOV_ITEM, 2, OOV_ITEM]  # "new" and the rare d: out of vocabulary
    assert [r["history"] for r in q] == [[2, 1, 3], [1, 3], [1, 2]]  # no OOV item in any history
    assert [r["n_history"] for r in q] == [3, 3, 2]  # events before the target, OOV ones included
    assert p.oov_eval_targets == 2 and p.num_eval_queries == 3
    assert np.load(p.item_counts).tolist() == [0, 3, 2, 2]


def test_oov_target_is_a_miss():
    counts = torch.tensor([0, 5, 3, 1])
    scorer = PopularityScorer(counts, 0, 4)
    batch = EvalBatch(torch.zeros(2, 1), torch.tensor([1, OOV_ITEM]))
    ranks = rank_batch(scorer, batch, k=2).ranks.tolist()
    assert ranks == [1, 4]  # after all three items


def test_auto_builds_for_strings_and_hashes_only(tmp_path):
    strings = write_raw_log(tmp_path / "s", ROWS)
    assert needs_vocabulary(strings, VocabConfig())
    dense = write_raw_log(tmp_path / "d", [(1, 1, "2026-01-01 00:00:01"), (2, 2, "2026-01-01 00:00:02")],
                          item_type=pa.int64(), user_type=pa.int64())
    assert not needs_vocabulary(dense, VocabConfig())
    assert needs_vocabulary(dense, VocabConfig(build="always")) and needs_vocabulary(dense, VocabConfig(min_count=2))
    hashed = write_raw_log(tmp_path / "h", [(1, int(hashed_ids([7])[0]), "2026-01-01 00:00:01")],
                           item_type=pa.int64(), user_type=pa.int64())
    assert needs_vocabulary(hashed, VocabConfig())
    assert not needs_vocabulary(strings, VocabConfig(build="never"))


def test_bad_raw_logs_name_the_file_and_column(tmp_path):
    log = write_raw_log(tmp_path / "mixed", ROWS[:3])
    write_raw_log(tmp_path / "mixed", [("u9", 5, "2026-01-01 00:00:09")], part="part-1.parquet", item_type=pa.int64())
    with pytest.raises(LogError, match="part-1.parquet.*column 'item_id' has type int64"):
        needs_vocabulary(log, VocabConfig())
    floats = write_raw_log(tmp_path / "floats", [("u1", 1.5, "2026-01-01 00:00:01")], item_type=pa.float64())
    with pytest.raises(LogError, match="part-0.parquet: column 'item_id' has type double, expected integer or string"):
        build_vocabulary(floats, None, VocabConfig(), backend="arrow")
    with pytest.raises(LogError, match="the vocabulary is empty: no item .* data.vocab.min_count=9"):
        build_vocabulary(write_raw_log(tmp_path / "few", ROWS), WINDOW, VocabConfig(min_count=9), backend="arrow")
    nulls = write_raw_log(tmp_path / "nulls", [("u1", None, "2026-01-01 00:00:01"), ("u1", "a", "2026-01-01 00:00:02")])
    with pytest.raises(LogError, match="bad rows \\(1 null value\\)"):
        build_vocabulary(nulls, None, VocabConfig(), backend="arrow")


@pytest.mark.parametrize("kind", ["string", "hashed"])
def test_raw_synthetic_ids_give_the_dense_log_s_sequences_and_oracle(tmp_path, kind):
    """The generator writes the same events with raw ids; the oracle reads them back exactly, and the
    vocabulary renumbers items by training-window frequency without losing or merging any."""
    synth = dict(users=200, items=80, days=3, workers=1)
    dense = prepare(DataConfig(synth=SynthConfig(**synth), backend="arrow"), tmp_path / "dense", query_len=8)
    raw = prepare(DataConfig(synth=SynthConfig(**synth, raw_ids=kind), backend="arrow"), tmp_path / kind,
                  query_len=8)
    assert not dense.vocab and raw.vocab and raw.num_eval_queries == dense.num_eval_queries
    assert raw.oov_eval_targets > 0  # items new on the held-out day
    ks = (1, 10)
    assert oracle_metrics(raw.log_dir, raw.eval_day, ks, backend="arrow") == \
        oracle_metrics(dense.log_dir, dense.eval_day, ks, seq_dir=dense.sequences)
    # the training sequences are the dense ones relabelled: read back through the vocabulary, equal per user
    vocab = Vocabulary.load(raw.vocab)
    back = {row: (int(x.removeprefix("sku-")) if kind == "string" else int(unhashed_ids([x])[0]))
            for row, x in enumerate(vocab.items.column("raw_id").to_pylist(), start=1)}
    assert len(set(back.values())) == len(back) == raw.num_items <= dense.num_items
    by_user = {r["user_id"]: r["item_ids"] for r in read_sequences(dense.train_sequences).to_pylist()}
    for r in read_sequences(raw.train_sequences).to_pylist():
        if kind == "string":
            user = int(vocab.users.column("raw_id")[r["user_id"] - 1].as_py().removeprefix("user-"))
        else:
            user = int(unhashed_ids([r["user_id"]])[0])
        assert by_user.pop(user) == [back[row] for row in r["item_ids"]]
    assert not by_user  # every user, once
