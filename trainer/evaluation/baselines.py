"""Baselines reported beside the model: the most popular items of the training window, and on synthetic
held-out-day logs the generator's Bayes-optimal oracle. Both run on the driver, in one process."""

import os
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data.oracle import oracle_metrics
from data.prepare import PreparedData
from data.sequences import sequence_files
from trainer.config import Config
from trainer.evaluation.metrics import MetricSums
from trainer.evaluation.queries import query_tensors


class PopularityRanking:
    """Every query ranks items by their training-window count: one global order, (count desc, id asc), the
    same total order as the model's ranking (trainer/evaluation/ranking.py). A target's rank is a lookup in
    it, less the query's excluded seen items ahead of the target; its top-k is the order's head without them.
    O(N log N) once and O(S + k) per query, where scoring every item would be O(N) per query."""

    def __init__(self, counts: np.ndarray) -> None:
        self.num_items = len(counts) - 1
        ids = np.arange(1, self.num_items + 1)
        self.order = ids[np.lexsort((ids, -np.asarray(counts[1:], np.float64)))]  # (N,) best first
        self.pos = np.full(self.num_items + 1, self.num_items, np.int64)  # (N + 1,) place in the order
        self.pos[self.order] = np.arange(self.num_items)

    def ranks(self, targets: np.ndarray, seen: np.ndarray, exclude_seen: bool) -> np.ndarray:
        """(B,) 1-based ranks; `seen` (B, S) padded with 0. A target outside the table ranks after every item."""
        oov = targets > self.num_items
        t = np.where(oov, 0, targets)
        ranks = self.pos[t] + 1
        if exclude_seen and seen.size:
            s = np.where(seen <= self.num_items, seen, 0)
            ahead = (s != 0) & (s != targets[:, None]) & (self.pos[s] < self.pos[t][:, None])
            ranks = ranks - ahead.sum(1)
        return np.where(oov, self.num_items + 1, ranks)

    def topk(self, targets: np.ndarray, seen: np.ndarray, k: int, exclude_seen: bool) -> np.ndarray:
        """(B, k) best item ids, -1 where fewer than k items are left. A seen target is not excluded."""
        b = seen.shape[0]
        width = seen.shape[1] if exclude_seen else 0
        head = self.order[: k + width]  # (k + S,) enough to fill k after any S exclusions
        excluded = np.zeros((b, len(head)), bool)  # (B, k + S)
        if width:
            # a seen item's place in the order says which head column it knocks out: O(B S), no (B, k+S, S)
            drop = np.where((seen == targets[:, None]) | (seen > self.num_items), 0, seen)  # (B, S)
            place = self.pos[drop]  # (B, S); padding (0) has place N, past any head
            rows, cols = np.nonzero(place < len(head))
            excluded[rows, place[rows, cols]] = True
        cols = np.argsort(excluded, axis=1, kind="stable")[:, :k]  # kept items first, in order
        ids = np.where(np.take_along_axis(excluded, cols, 1), -1, head[cols]) if len(head) else \
            np.zeros((b, 0), np.int64)
        return np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)


def popularity_metrics(counts: np.ndarray, query_batches: Iterable[pa.Table], ks: Sequence[int],
                       exclude_seen: bool, seq_len: int) -> dict[str, float]:
    """HR@k, NDCG@k, MRR and recall@k of the most-popular-items ranking (PopularityRanking), through the same
    metric code as the model. Equal to ranking every item with a PopularityScorer (tested)."""
    ranking = PopularityRanking(counts)
    sums = MetricSums(ks)
    for rows in query_batches:
        q = query_tensors(rows, seq_len)
        targets, seen = q["targets"].numpy(), q["seen"].numpy()
        sums.add_ranks(torch.from_numpy(ranking.ranks(targets, seen, exclude_seen)))
        sums.add_recall(torch.from_numpy(ranking.topk(targets, seen, max(ks), exclude_seen)), q["relevant"])
    return sums.means()


def baselines(cfg: Config, data: PreparedData) -> dict[str, Any]:
    """The baselines the config asks for, by name: popularity (eval.popularity_baseline), oracle (eval.oracle)."""
    out: dict[str, Any] = {}
    if cfg.eval.popularity_baseline:
        batches = (pq.read_table(p) for p in sequence_files(data.eval_queries))
        out["popularity"] = popularity_metrics(data.load_item_counts(cfg.model.num_items), batches, cfg.eval.ks,
                                               cfg.eval.exclude_seen, cfg.model.max_seq_len)
    if cfg.eval.oracle and data.synthetic and data.eval_day is not None:
        # the oracle needs sequences in the generator's ids: the prepared ones, unless a vocabulary renumbered them
        out["oracle"] = oracle_metrics(data.log_dir, data.eval_day, cfg.eval.ks, min_history=cfg.data.min_history,
                                       backend=cfg.data.backend, seq_dir=None if data.vocab else data.sequences,
                                       work_dir=os.path.dirname(data.sequences))
    return out
