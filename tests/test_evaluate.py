"""Distributed full-catalogue ranking == single-process brute force, for every sharding plan.

The brute force here is deliberately naive (a Python sort per query by (score desc, id asc))
and shares no code with trainer/evaluation/ranking.py except the metric formulas (tested in test_metrics).
Integer-valued tables and queries make every dot product exact and create many ties, so ranks
and top-k lists must match exactly, tie-breaking included.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers import DIM, NUM_ITEMS, run_distributed
from tests.helpers import small_stack_config as small_config
from trainer.distributed.collectives import padded
from trainer.distributed.context import DistContext
from trainer.distributed.embeddings import ShardedItemTable
from trainer.evaluation import ranking
from trainer.evaluation.metrics import MetricSums
from trainer.evaluation.ranking import (
    EmbeddingScorer,
    EvalBatch,
    PopularityScorer,
    chunk_topk,
    evaluate,
    order_topk,
    rank_batch,
)

NUM_ROWS = NUM_ITEMS + 1
KS = [1, 5, 10]
BATCH_SIZES = {0: [5, 3], 1: [4]}  # rank 0 has two batches, rank 1 one: exercises the padding


def make_data(kind: str) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(7)
    if kind == "int":
        table = torch.randint(-2, 3, (NUM_ROWS, DIM), generator=gen).float()
    else:
        table = torch.randn(NUM_ROWS, DIM, generator=gen)
    table[0] = 0
    counts = torch.randint(0, 4, (NUM_ROWS,), generator=gen)  # popularity with many ties
    batches: dict[int, list[EvalBatch]] = {}
    for rank, sizes in BATCH_SIZES.items():
        batches[rank] = []
        for b in sizes:
            queries = torch.randint(-2, 3, (b, DIM), generator=gen).float() if kind == "int" \
                else torch.randn(b, DIM, generator=gen)
            targets = torch.randint(1, NUM_ROWS, (b,), generator=gen)
            seen = torch.randint(0, NUM_ROWS, (b, 6), generator=gen)
            seen[0, 0] = targets[0]  # a seen target is never excluded
            relevant = torch.randint(0, NUM_ROWS, (b, 4), generator=gen)
            relevant[:, 0] = targets
            batches[rank].append(EvalBatch(queries, targets, seen, relevant))
    return {"table": table, "counts": counts, "batches": batches}


def brute_force(scores: torch.Tensor, batch: EvalBatch, k: int,
                exclude_seen: bool) -> tuple[list[int], list[list[int]]]:
    """Ranks and top-k ids by sorting every item of every query, (score desc, id asc)."""
    ranks, tops = [], []
    for q in range(scores.shape[0]):
        s = scores[q].tolist()
        target = int(batch.targets[q])
        s[0] = float("-inf")
        if exclude_seen:
            for item in batch.seen[q].tolist():  # type: ignore[union-attr]
                if item not in (0, target):
                    s[item] = float("-inf")
        order = sorted(range(NUM_ROWS), key=lambda i: (-s[i], i))
        ranks.append(order.index(target) + 1)
        tops.append([i if s[i] != float("-inf") else -1 for i in order[:k]])
    return ranks, tops


def _eval_worker(rank: int, world: int, sharding: str, kind: str, exclude_seen: bool) -> dict[str, Any]:
    data = make_data(kind)
    table = ShardedItemTable(small_config(sharding), DistContext.from_process_group())
    table.copy_from_full(data["table"])
    scorers = {"model": EmbeddingScorer(*table.row_block()),
               "popularity": PopularityScorer(data["counts"], *table.row_range())}
    out: dict[str, Any] = {"type": table.sharding_type}
    for name, scorer in scorers.items():
        most = max(len(b) for b in data["batches"].values())
        results, batches = [], list(padded(data["batches"][rank], most))
        for batch in batches:
            batch = batch if batch is not None else EvalBatch.empty(DIM)
            # tiny chunks: several per rank, so the running top-k merge is exercised
            r = rank_batch(scorer, batch, max(KS), exclude_seen, max_chunk_elems=13 * 12)
            results.append((r.ranks, r.topk_ids))
        out[name] = results
        out[name + "_metrics"] = evaluate(scorer, batches, KS, DIM, exclude_seen)
    return out


def expected(data: dict[str, Any], name: str, exclude_seen: bool) -> tuple[dict[int, list], dict[str, float]]:
    per_rank: dict[int, list] = {}
    sums = MetricSums(KS)
    for rank, batches in data["batches"].items():
        per_rank[rank] = []
        for batch in batches:
            if name == "model":
                scores = batch.queries.double() @ data["table"].double().T
            else:
                scores = data["counts"].double().expand(batch.queries.shape[0], -1)
            ranks, tops = brute_force(scores, batch, max(KS), exclude_seen)
            per_rank[rank].append((ranks, tops))
            sums.add_ranks(torch.tensor(ranks))
            sums.add_recall(torch.tensor(tops), batch.relevant)  # type: ignore[arg-type]
    return per_rank, sums.means()


@pytest.mark.parametrize("sharding,kind,exclude_seen", [
    ("table_wise", "int", True),
    ("row_wise", "int", False),
    ("row_wise", "normal", True),
    ("column_wise", "int", True),
    ("column_wise", "normal", False),
])
def test_distributed_ranking_equals_brute_force(sharding: str, kind: str, exclude_seen: bool) -> None:
    data = make_data(kind)
    outs = run_distributed(_eval_worker, 2, sharding, kind, exclude_seen)
    for name in ("model", "popularity"):
        want, want_metrics = expected(data, name, exclude_seen)
        for rank, out in enumerate(outs):
            assert out["type"] == sharding
            got = out[name][: len(want[rank])]
            assert all(r.numel() == 0 for r, _ in out[name][len(want[rank]):])  # padding batches
            for (ranks, tops), (want_ranks, want_tops) in zip(got, want[rank]):
                assert ranks.tolist() == want_ranks, (name, rank)
                assert tops.tolist() == want_tops, (name, rank)
            assert out[name + "_metrics"].keys() == want_metrics.keys()
            for key, value in want_metrics.items():
                assert out[name + "_metrics"][key] == pytest.approx(value, rel=1e-12), (name, key)


def test_single_process_ranking_without_a_group() -> None:
    data = make_data("int")
    scorer = EmbeddingScorer(0, data["table"])
    batch = data["batches"][0][0]
    result = rank_batch(scorer, batch, 10, exclude_seen=True, max_chunk_elems=40)
    want_ranks, want_tops = brute_force(batch.queries.double() @ data["table"].double().T, batch, 10, True)
    assert result.ranks.tolist() == want_ranks
    assert result.topk_ids.tolist() == want_tops
    # the top-k list and the rank agree: target in top-k exactly when rank <= k
    for q, target in enumerate(batch.targets.tolist()):
        assert (target in result.topk_ids[q].tolist()) == (want_ranks[q] <= 10)


def test_chunk_topk_breaks_ties_by_smallest_id() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0, 5.0, 0.0]])
    values, ids = chunk_topk(scores, lo=10, k=3)
    assert ids.tolist() == [[11, 12, 14], [14, 10, 11]]
    assert values.tolist() == [[3.0, 3.0, 3.0], [5.0, 0.0, 0.0]]
    values, ids = order_topk(torch.tensor([[2.0, 2.0, 9.0]]), torch.tensor([[7, 3, 5]]), 2)
    assert ids.tolist() == [[5, 3]]


def test_targets_must_be_items() -> None:
    scorer = EmbeddingScorer(0, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="targets"):
        rank_batch(scorer, EvalBatch(torch.zeros(1, 2), torch.tensor([0])), 3)


def _overlap_worker(rank: int, world: int) -> str:
    scorer = PopularityScorer(torch.arange(10.0), 0, 10)  # every rank claims every item: wrong
    try:
        rank_batch(scorer, EvalBatch(torch.zeros(1, 1), torch.tensor([3])), 2)
    except ValueError as e:
        return str(e)
    return "accepted"


def test_overlapping_item_ranges_are_refused() -> None:
    for message in run_distributed(_overlap_worker, 2):
        assert "overlap" in message


@pytest.mark.parametrize("kind", ["int", "normal"])
def test_many_chunks_take_the_group_filter_and_stay_exact(kind: str, monkeypatch) -> None:
    """A catalogue of many chunks wide enough for the top-k's group filter (update_topk): after the first
    chunks most take it, and ranks and top-k lists still equal the brute force, ties included."""
    gen = torch.Generator().manual_seed(3)
    rows, dim, q, k = 6001, 4, 24, 10
    if kind == "int":  # tiny integer vectors: scores in a few values, ties everywhere
        table = torch.randint(-1, 2, (rows, dim), generator=gen).float()
        queries = torch.randint(-1, 2, (q, dim), generator=gen).float()
    else:
        table, queries = torch.randn(rows, dim, generator=gen), torch.randn(q, dim, generator=gen)
    table[0] = 0
    targets = torch.randint(1, rows, (q,), generator=gen)
    seen = torch.randint(0, rows, (q, 30), generator=gen)
    exact = {"n": 0}
    real = ranking.chunk_topk

    def counted(*args, **kwargs):
        exact["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ranking, "chunk_topk", counted)
    result = rank_batch(EmbeddingScorer(0, table), EvalBatch(queries, targets, seen), k, exclude_seen=True,
                        max_chunk_elems=q * 256)  # chunks of 256 items: 24 of them
    chunks = -(-rows // 256)
    assert exact["n"] < chunks / 2 if kind == "normal" else exact["n"] <= chunks  # the filter ran
    scores = (queries.double() @ table.double().T).numpy()
    for i in range(q):
        s, t = scores[i].copy(), int(targets[i])
        s[0] = float("-inf")
        for item in seen[i].tolist():
            if item not in (0, t):
                s[item] = float("-inf")
        order = sorted(range(rows), key=lambda j: (-s[j], j))
        assert int(result.ranks[i]) == order.index(t) + 1
        assert result.topk_ids[i].tolist() == [j if s[j] != float("-inf") else -1 for j in order[:k]]


def test_group_filter_equals_the_exact_merge_at_ties() -> None:
    """update_topk with a running list whose k-th value ties items of the chunk: those rank after it (larger
    ids), whichever path merges them."""
    top = (torch.tensor([[5.0, 3.0, 3.0]], dtype=torch.float64), torch.tensor([[4, 1, 2]]))
    scores = torch.full((1, 512), 3.0)  # every item ties the running k-th value
    scores[0, 300] = 4.0
    values, ids = ranking.update_topk(top, scores, 100, 3)
    assert ids.tolist() == [[4, 400, 1]] and values.tolist() == [[5.0, 4.0, 3.0]]
    scores[0, 7 * 64 + 5] = 9.0  # two groups above tau: still in hand
    values, ids = ranking.update_topk(top, scores, 100, 3)
    assert ids.tolist() == [[100 + 7 * 64 + 5, 4, 400]]
