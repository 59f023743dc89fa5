"""The run's held-out metrics, recomputed in one process from a model directory.

The run ranked every query on W ranks (trainer/worker/loop.py `Trainer.evaluate`). To reproduce its floats
exactly, this follows the same arithmetic: each virtual rank r reads the same row range of the query files
and the same batches (`RowShard`, eval.batch_size), its batches are encoded separately (the same forward
shapes), the ranks' i-th batches are concatenated in rank order (what the all-gather builds) and ranked
against the whole table, and each rank's metric sums are kept apart and added in rank order at the end (what
the all-reduce does). Torch runs on one thread, as every worker did (distributed.cpus_per_worker < 2).
"""

from __future__ import annotations

from typing import Sequence

import torch

from data.sequences import sequence_files
from data.shards import RowShard
from trainer.evaluation.metrics import MetricSums
from trainer.evaluation.queries import query_tensors
from trainer.evaluation.ranking import EmbeddingScorer, EvalBatch, rank_batch
from trainer.serving.model_dir import ServingModel


@torch.no_grad()
def heldout_metrics(model: ServingModel, queries_dir: str, ks: Sequence[int], exclude_seen: bool,
                    world_size: int, batch_rows: int, threads: int = 1) -> dict[str, float]:
    """HR@k, NDCG@k, MRR and recall@k of `queries_dir` as a `world_size`-rank run computed them."""
    files = sequence_files(queries_dir)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        iters = [iter(RowShard(files, r, world_size).iter_tables(batch_rows=batch_rows)) for r in range(world_size)]
        scorer = EmbeddingScorer(0, model.items)
        sums = [MetricSums(ks) for _ in range(world_size)]
        k = max(ks)
        while True:
            parts = [next(it, None) for it in iters]
            if all(p is None for p in parts):
                break
            per_rank = [None if p is None else query_tensors(p, model.meta.model.max_seq_len) for p in parts]
            users = [model.user_vectors(q["history"]) for q in per_rank if q is not None]  # (B_r, D) each
            present = [q for q in per_rank if q is not None]
            seen_w = max(q["seen"].shape[1] for q in present) if exclude_seen else 0
            batch = EvalBatch(torch.cat(users), torch.cat([q["targets"] for q in present]),
                              torch.cat([_pad(q["seen"], seen_w) for q in present]) if exclude_seen else None)
            result = rank_batch(scorer, batch, k, exclude_seen)
            offset = 0
            for r, q in enumerate(per_rank):
                if q is None:
                    continue
                b = q["targets"].shape[0]
                sums[r].add_ranks(result.ranks[offset : offset + b])
                sums[r].add_recall(result.topk_ids[offset : offset + b], q["relevant"])
                offset += b
    finally:
        torch.set_num_threads(before)
    return _combine(sums).means()


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    out = torch.zeros(x.shape[0], width, dtype=torch.long)
    out[:, : x.shape[1]] = x
    return out


def _combine(sums: list[MetricSums]) -> MetricSums:
    """Sum the ranks' sums in rank order, as an all-reduce of float64 sums does."""
    out = MetricSums(sums[0].ks)
    for name in sums[0].sums:
        total, count = 0.0, 0
        for s in sums:
            total += s.sums.get(name, 0.0)
            count += s.counts.get(name, 0)
        out.sums[name], out.counts[name] = total, count
    return out
