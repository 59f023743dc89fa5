"""The popularity baseline's global-order ranking equals ranking every item (PopularityScorer, the plain
reference) exactly: ties, excluded seen items, out-of-vocabulary targets and catalogues smaller than k."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from data.split import QUERY_SCHEMA
from data.vocab import OOV_ITEM
from trainer.evaluation.baselines import PopularityRanking, popularity_metrics
from trainer.evaluation.queries import query_tensors
from trainer.evaluation.ranking import EvalBatch, PopularityScorer, evaluate, rank_batch


def queries(rng: np.random.Generator, n: int, num_items: int) -> pa.Table:
    def lists(max_len: int) -> list[list[int]]:
        return [rng.integers(1, num_items + 1, rng.integers(0, max_len + 1)).tolist() for _ in range(n)]

    targets = rng.integers(1, num_items + 1, n)
    targets[::7] = OOV_ITEM  # some targets outside the vocabulary
    seen = [sorted(set(s) | ({int(t)} if i % 3 == 0 and t != OOV_ITEM else set()))  # a seen target stays
            for i, (s, t) in enumerate(zip(lists(6), targets))]
    return pa.table({"user_id": np.arange(n), "history": lists(5), "target": targets, "day_items": lists(4),
                     "seen_items": seen, "n_history": np.zeros(n, np.int64)}, schema=QUERY_SCHEMA)


def reference(counts: np.ndarray, tables: list[pa.Table], ks, exclude_seen: bool) -> dict:
    scorer = PopularityScorer(torch.from_numpy(counts), 0, len(counts))
    batches = []
    for t in tables:
        q = query_tensors(t, 5)
        batches.append(EvalBatch(torch.zeros(len(q["targets"]), 1), q["targets"], q["seen"], q["relevant"]))
    return evaluate(scorer, batches, ks, dim=1, exclude_seen=exclude_seen)


@pytest.mark.parametrize("num_items, exclude_seen", [(40, True), (40, False), (6, True), (3, False)])
def test_global_order_equals_scoring_every_item(num_items, exclude_seen):
    rng = np.random.default_rng(num_items)
    counts = np.concatenate([[0], rng.integers(0, 4, num_items)])  # few distinct counts: many ties
    tables = [queries(rng, 50, num_items), queries(rng, 17, num_items)]
    ks = [1, 5, 10]  # 10 > 6 and 3 items: lists shorter than k
    fast = popularity_metrics(counts, tables, ks, exclude_seen, 5)
    slow = reference(counts, tables, ks, exclude_seen)
    assert fast.keys() == slow.keys()
    for key, value in slow.items():
        assert fast[key] == pytest.approx(value, abs=1e-12), key


def test_ranks_and_top_lists_per_query():
    counts = np.array([0, 5, 9, 5, 1])  # order: 2, 1, 3, 4 (1 and 3 tie: smaller id first)
    ranking = PopularityRanking(counts)
    seen = np.array([[2, 0], [0, 0], [1, 3]])
    targets = np.array([3, 4, OOV_ITEM])
    assert ranking.ranks(targets, seen, exclude_seen=False).tolist() == [3, 4, 5]
    assert ranking.ranks(targets, seen, exclude_seen=True).tolist() == [2, 4, 5]
    assert ranking.topk(targets, seen, 3, exclude_seen=True).tolist() == [[1, 3, 4], [2, 1, 3], [2, 4, -1]]
    ref = rank_batch(PopularityScorer(torch.from_numpy(counts), 0, 5),
                     EvalBatch(torch.zeros(3, 1), torch.from_numpy(targets), torch.from_numpy(seen)), 3,
                     exclude_seen=True)
    assert ref.ranks.tolist() == [2, 4, 5] and ref.topk_ids.tolist() == [[1, 3, 4], [2, 1, 3], [2, 4, -1]]


def test_top_lists_with_long_seen_lists_stay_small_in_memory():
    # ml-1m: 6,040 queries of up to 2,313 seen items; a (B, k + S, S) comparison would be 30 GiB
    import tracemalloc

    rng = np.random.default_rng(0)
    b, s, n, k = 500, 1000, 2000, 50
    ranking = PopularityRanking(np.concatenate([[0], rng.integers(0, 50, n)]))
    seen = np.sort(np.stack([rng.choice(np.arange(1, n + 1), s, replace=False) for _ in range(b)]), axis=1)
    seen[:, :100] = 0  # padding
    seen[0, -1] = n + 5  # an out-of-vocabulary seen item is ignored
    targets = seen[:, -2].copy()  # a seen target stays
    tracemalloc.start()
    top = ranking.topk(targets, seen, k, exclude_seen=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 << 20, peak  # a (B, k + S, S) bool array would be 525 MB
    for row in range(0, b, 97):  # the first k of the order that are not excluded
        drop = set(seen[row].tolist()) - {int(targets[row])}
        want = [int(i) for i in ranking.order if int(i) not in drop][:k]
        assert top[row].tolist() == want
