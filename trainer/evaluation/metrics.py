"""Retrieval metrics from 1-based ranks and top-k lists. Plain tensors in, floats out.

Per query with one held-out target at rank r (1 = best):
    HR@k   = 1[r <= k]
    NDCG@k = 1[r <= k] / log2(r + 1)        (one relevant item, so the ideal DCG is 1)
    MRR    = 1 / r                           (full rank, no cut-off)
Per query with a set R of relevant items (all of the held-out day's items) and top-k list T:
    recall@k = |T[:k] & R| / |R|             (queries with empty R are skipped)

`MetricSums` accumulates per-query sums and counts, so batches (and ranks) combine exactly by
adding, and `means()` divides once at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


def hit_rate(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """(Q,) ranks -> (Q,) 0/1."""
    return (ranks <= k).double()


def ndcg(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """(Q,) ranks -> (Q,) gains; 1/log2(rank+1) inside the cut-off, 0 outside."""
    r = ranks.double()
    return torch.where(ranks <= k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r))


def reciprocal_rank(ranks: torch.Tensor) -> torch.Tensor:
    return 1.0 / ranks.double()


def recall(topk: torch.Tensor, relevant: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query recall@k and which queries count.

    topk: (Q, K>=k) item ids, best first (-1 for an empty slot); relevant: (Q, R) item ids padded
    with 0 (0 is never an item), duplicates allowed (counted once). Returns (recall (Q,), valid (Q,)).
    """
    assert topk.shape[1] >= k, (topk.shape, k)
    rel = _dedup_rows(relevant)  # (Q, R), duplicates -> 0
    n_rel = (rel != 0).sum(1)  # (Q,)
    top = topk[:, :k]  # (Q, k), ids are distinct within a row
    hits = ((top[:, :, None] == rel[:, None, :]) & (rel[:, None, :] != 0)).any(2).sum(1)  # (Q,)
    valid = n_rel > 0
    return hits.double() / n_rel.clamp(min=1).double(), valid


def _dedup_rows(ids: torch.Tensor) -> torch.Tensor:
    """Zero every repeat of an id within its row (keeps the first)."""
    s, _ = ids.sort(dim=1)
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    return s.masked_fill(dup, 0)


@dataclass
class MetricSums:
    """Sums of per-query metric values and the counts they average over."""

    ks: Sequence[int]
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def _add(self, name: str, values: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.counts[name] = self.counts.get(name, 0) + int(values.numel())

    def add_ranks(self, ranks: torch.Tensor) -> None:
        """(Q,) 1-based ranks of each query's target."""
        if ranks.numel() and int(ranks.min()) < 1:
            raise ValueError("ranks are 1-based")
        for k in self.ks:
            self._add(f"hr@{k}", hit_rate(ranks, k))
            self._add(f"ndcg@{k}", ndcg(ranks, k))
        self._add("mrr", reciprocal_rank(ranks))

    def add_recall(self, topk: torch.Tensor, relevant: torch.Tensor) -> None:
        for k in self.ks:
            values, valid = recall(topk, relevant, k)
            self._add(f"recall@{k}", values[valid])

    def means(self) -> dict[str, float]:
        """name -> mean over the queries it counted (NaN when none did)."""
        return {name: (self.sums[name] / n if n else math.nan) for name, n in self.counts.items()}
