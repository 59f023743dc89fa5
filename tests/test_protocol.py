"""The MovieLens leave-one-out protocol (docs/movielens.md), exactly, on hand-made cases.

What is already tested elsewhere is not repeated: test_data_split.test_leave_one_out (the files written by
leave_one_out), test_evaluate (distributed ranking == brute force on random tables), test_metrics (HR, NDCG,
MRR at small k). Here: the pure row function `loo_rows` (including repeats, short users and the test
query's seen list), the tie rule deciding which event is held out, seen-item exclusion on hand-computed
ranks from query rows to metrics, and the reported metric set at its k=10 / k=50 boundaries.
"""

import math

import pyarrow as pa
import pytest
import torch

from data.schema import TS, USER
from data.sequences import SEQ_SCHEMA, build_sequences
from data.split import QUERY_SCHEMA, leave_one_out, loo_rows, read_queries
from tests.helpers import write_log
from trainer.evaluation.metrics import MetricSums
from trainer.evaluation.queries import query_tensors
from trainer.evaluation.ranking import EmbeddingScorer, EvalBatch, evaluate, rank_batch

T0 = 978_307_200_000_000  # 2001-01-01 00:00:00 UTC in microseconds

# user -> items in time order (timestamps T0 + 1 s, + 2 s, ...)
SEQS = {
    1: [5, 3, 5, 7, 2],  # repeat of 5 inside the history
    2: [4, 9, 4],  # exactly three events; the test target 4 was seen before
    3: [1, 6],  # two events: training only
    4: [8],  # one event: training only
}


def seq_table(seqs: dict) -> pa.Table:
    return pa.table(
        {
            USER: list(seqs),
            "item_ids": list(seqs.values()),
            TS: [[T0 + 1_000_000 * (j + 1) for j in range(len(v))] for v in seqs.values()],
        },
        schema=SEQ_SCHEMA,
    )


def test_loo_train_rows_drop_the_last_two_events_of_users_with_three_or_more():
    train = loo_rows(seq_table(SEQS), "train", query_len=50)
    assert train.schema == SEQ_SCHEMA
    assert train.column(USER).to_pylist() == [1, 2, 3, 4]
    assert train.column("item_ids").to_pylist() == [[5, 3, 5], [4], [1, 6], [8]]
    # timestamps travel with their items
    ts = [[int(t.timestamp() * 1_000_000) - T0 for t in row] for row in train.column(TS).to_pylist()]
    assert ts == [[1_000_000, 2_000_000, 3_000_000], [1_000_000], [1_000_000, 2_000_000], [1_000_000]]


def test_loo_valid_queries_second_to_last_with_the_history_before_it():
    valid = loo_rows(seq_table(SEQS), "valid", query_len=50)
    assert valid.schema == QUERY_SCHEMA
    assert valid.to_pylist() == [
        {USER: 1, "history": [5, 3, 5], "target": 7, "day_items": [7], "seen_items": [3, 5], "n_history": 3},
        {USER: 2, "history": [4], "target": 9, "day_items": [9], "seen_items": [4], "n_history": 1},
    ]


def test_loo_test_queries_last_event_with_the_validation_item_in_the_history():
    test = loo_rows(seq_table(SEQS), "test", query_len=50)
    assert test.to_pylist() == [
        {USER: 1, "history": [5, 3, 5, 7], "target": 2, "day_items": [2], "seen_items": [3, 5, 7], "n_history": 4},
        # the target itself is in seen_items; evaluation must never exclude it (see below)
        {USER: 2, "history": [4, 9], "target": 4, "day_items": [4], "seen_items": [4, 9], "n_history": 2},
    ]


def test_loo_history_is_cut_to_query_len_but_seen_items_and_n_history_are_not():
    test = loo_rows(seq_table(SEQS), "test", query_len=2)
    assert test.column("history").to_pylist() == [[5, 7], [4, 9]]
    assert test.column("seen_items").to_pylist() == [[3, 5, 7], [4, 9]]
    assert test.column("n_history").to_pylist() == [4, 2]
    valid = loo_rows(seq_table(SEQS), "valid", query_len=1)
    assert valid.column("history").to_pylist() == [[5], [4]]
    assert valid.column("seen_items").to_pylist() == [[3, 5], [4]]


def test_loo_without_eligible_users_gives_empty_queries():
    short = seq_table({3: [1, 6], 4: [8]})
    assert loo_rows(short, "test", query_len=5).num_rows == 0
    assert loo_rows(short, "valid", query_len=5).num_rows == 0
    assert loo_rows(short, "train", query_len=5).column("item_ids").to_pylist() == [[1, 6], [8]]


def test_same_second_ties_are_held_out_by_item_id(tmp_path):
    """Events at the same instant are ordered by item id, so the largest id of the last second is the test
    target and the next largest the validation target (the rule docs/movielens.md states)."""
    t = "2001-01-01 10:00:00"
    events = [(1, 30, t), (1, 10, t), (1, 20, t), (1, 99, "2001-01-01 09:00:00"),
              (2, 7, "2001-01-01 08:00:00"), (2, 3, t), (2, 5, t)]
    write_log(tmp_path / "log", events)
    build_sequences(tmp_path / "log", tmp_path / "seq", backend="arrow")
    res = leave_one_out(tmp_path / "seq", tmp_path / "loo", query_len=10)
    test, valid = read_queries(res.queries["test"]), read_queries(res.queries["valid"])
    assert test.column("target").to_pylist() == [30, 5]
    assert test.column("history").to_pylist() == [[99, 10, 20], [7, 3]]
    assert valid.column("target").to_pylist() == [20, 3]


# ---------------------------------------------------------------- seen-item exclusion, hand-computed

# One-dimensional items and queries: the score of item i for query q is q * w[i].
# item:          0 (padding)  1    2    3    4    5
WEIGHTS = [0.0, 5.0, 4.0, 3.0, 3.0, 1.0]


def _rank(targets, seen, exclude_seen, k=6, query=1.0):
    scorer = EmbeddingScorer(0, torch.tensor(WEIGHTS)[:, None])
    n = len(targets)
    batch = EvalBatch(torch.full((n, 1), query), torch.tensor(targets), torch.tensor(seen))
    return rank_batch(scorer, batch, k, exclude_seen=exclude_seen)


def test_seen_items_scored_above_the_target_do_not_count():
    # target 3 (score 3): ahead are 1 (5), 2 (4); 4 ties at 3 but has the larger id -> rank 3
    assert _rank([3], [[0, 0]], False).ranks.tolist() == [3]
    # seen 1 is excluded -> rank 2; seen 5 (below the target) changes nothing; 0 is padding of the list
    assert _rank([3], [[1, 5, 0]], True).ranks.tolist() == [2]
    # without exclude_seen the same seen list is ignored
    assert _rank([3], [[1, 5, 0]], False).ranks.tolist() == [3]


def test_the_target_is_never_excluded_even_when_seen_before():
    # target 3 is in its own seen list (a repeat): it stays, only 1 and 2 go -> rank 1
    r = _rank([3], [[3, 1, 2]], True)
    assert r.ranks.tolist() == [1]
    assert r.topk_ids.tolist() == [[3, 4, 5, -1, -1, -1]]  # excluded items and padding: -1 at the end
    # a tie with a smaller id counts against the target unless that item is excluded:
    # target 4 ties with 3 (smaller id) -> rank 4; seen 3 removes it -> rank 3; seen 1, 2, 3 -> rank 1
    assert _rank([4], [[0, 0, 0]], False).ranks.tolist() == [4]
    assert _rank([4], [[3, 0, 0]], True).ranks.tolist() == [3]
    assert _rank([4], [[1, 2, 3]], True).ranks.tolist() == [1]


def test_top_k_with_exclusion_by_hand():
    r = _rank([3, 5], [[1, 0], [2, 4]], True, k=3)
    assert r.ranks.tolist() == [2, 3]  # query 2: 1 (5), 3 (3) ahead of 5 (1); 2 and 4 excluded
    assert r.topk_ids.tolist() == [[2, 3, 4], [1, 3, 5]]
    assert r.topk_scores.tolist() == [[4.0, 3.0, 3.0], [5.0, 3.0, 1.0]]


def test_query_rows_to_metrics_end_to_end():
    """loo_rows test queries -> the trainer's query tensors -> ranks -> the reported metrics."""
    test = loo_rows(seq_table(SEQS), "test", query_len=50)
    q = query_tensors(test, seq_len=50)
    assert q["seen"].tolist() == [[3, 5, 7], [4, 9, 0]]
    # 10 items; user 1's target is 2, user 2's is 4. Scores (query 1.0): item i -> WEIGHTS2[i]
    weights = torch.tensor([0.0, 0.5, 6.0, 1.0, 8.0, 9.0, 0.5, 7.0, 0.0, 10.0])[:, None]
    scorer = EmbeddingScorer(0, weights)
    batch = EvalBatch(torch.ones(2, 1), q["targets"], q["seen"], q["relevant"])
    # user 1, target 2 (6.0): ahead 9 (10), 5 (9), 4 (8), 7 (7) -> rank 5; seen 5 and 7 excluded -> rank 3
    # user 2, target 4 (8.0): ahead 9 (10), 5 (9) -> rank 3; seen 9 excluded, 4 kept -> rank 2
    assert rank_batch(scorer, batch, 10, exclude_seen=False).ranks.tolist() == [5, 3]
    assert rank_batch(scorer, batch, 10, exclude_seen=True).ranks.tolist() == [3, 2]
    m = evaluate(scorer, [batch], ks=[1, 2, 10], dim=1, exclude_seen=True)
    assert m["hr@1"] == 0.0 and m["hr@2"] == 0.5 and m["hr@10"] == 1.0
    assert m["ndcg@2"] == pytest.approx((0 + 1 / math.log2(3)) / 2, abs=1e-15)
    assert m["ndcg@10"] == pytest.approx((0.5 + 1 / math.log2(3)) / 2, abs=1e-15)
    assert m["mrr"] == pytest.approx((1 / 3 + 1 / 2) / 2, abs=1e-15)
    assert m["recall@1"] == 0.0 and m["recall@10"] == 1.0  # day_items = [target] under LOO: recall = HR


# ---------------------------------------------------------------- the reported metric set


def test_hr_ndcg_at_10_and_50_and_mrr_by_hand():
    """HR@k = 1[r <= k], NDCG@k = 1[r <= k] / log2(r + 1), MRR = 1 / r, averaged over queries.
    Ranks at and just past each cut-off; 1, 3, 7, 31 have exact gains 1, 1/2, 1/3, 1/5."""
    ranks = torch.tensor([1, 3, 7, 10, 11, 31, 50, 51])
    sums = MetricSums([10, 50])
    sums.add_ranks(ranks)
    m = sums.means()
    assert m["hr@10"] == 4 / 8
    assert m["hr@50"] == 7 / 8
    g = {1: 1.0, 3: 0.5, 7: 1 / 3, 10: 1 / math.log2(11), 11: 1 / math.log2(12), 31: 0.2, 50: 1 / math.log2(51)}
    assert m["ndcg@10"] == pytest.approx((g[1] + g[3] + g[7] + g[10]) / 8, abs=1e-15)
    assert m["ndcg@50"] == pytest.approx(sum(g.values()) / 8, abs=1e-15)
    assert m["mrr"] == pytest.approx(sum(1 / r for r in ranks.tolist()) / 8, abs=1e-15)
    assert set(m) == {"hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr"}
