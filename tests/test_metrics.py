"""Retrieval metrics on hand-made cases with known answers."""

import math

import pytest
import torch

from trainer.evaluation.metrics import MetricSums, hit_rate, ndcg, recall, reciprocal_rank


def test_hit_rate_ndcg_mrr_by_hand() -> None:
    ranks = torch.tensor([1, 2, 3, 11])
    assert hit_rate(ranks, 1).tolist() == [1, 0, 0, 0]
    assert hit_rate(ranks, 10).tolist() == [1, 1, 1, 0]
    assert ndcg(ranks, 10).tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.5, 0.0])
    assert ndcg(ranks, 2).tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.0, 0.0])
    assert reciprocal_rank(ranks).tolist() == pytest.approx([1.0, 0.5, 1 / 3, 1 / 11])


def test_recall_counts_each_relevant_item_once() -> None:
    topk = torch.tensor([[5, 7, 9, 2], [1, 2, 3, 4], [8, -1, -1, -1]])
    relevant = torch.tensor([[7, 2, 2, 0], [9, 0, 0, 0], [0, 0, 0, 0]])  # dup 2; padded 0
    r, valid = recall(topk, relevant, 2)
    assert valid.tolist() == [True, True, False]
    assert r[:2].tolist() == [0.5, 0.0]  # {7} of {7, 2}
    r, _ = recall(topk, relevant, 4)
    assert r[:2].tolist() == [1.0, 0.0]


def test_metric_sums_average_over_batches() -> None:
    a = MetricSums([1, 3])
    a.add_ranks(torch.tensor([1, 4]))
    a.add_ranks(torch.tensor([2]))
    a.add_recall(torch.tensor([[3, 1, 2]]), torch.tensor([[1, 9]]))
    m = a.means()
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert m["mrr"] == pytest.approx((1 + 0.25 + 0.5) / 3)
    assert m["recall@1"] == 0.0 and m["recall@3"] == 0.5  # one query with relevant items


def test_ranks_are_one_based() -> None:
    with pytest.raises(ValueError):
        MetricSums([1]).add_ranks(torch.tensor([0]))
