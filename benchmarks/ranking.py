"""Full-catalogue ranking (exact ranks and ties, seen items excluded, top-k, metrics) against one plain torch
matmul + topk over the same rows, side by side in one process.

    python -m benchmarks.ranking --items 1000000 --queries 2048 --out benchmarks/results/ranking-cpu.json

Both score every query against every item in the same chunks; the plain side only keeps torch.topk of each
chunk (no exact rank, no tie rule, no exclusion), which is the floor. Reported: queries/s of each and
`eval_vs_matmul_topk` (ours over the floor; the target is >= 0.8).
"""

import argparse
import os
import time
from typing import Any

import torch

from benchmarks.results import provenance, write_result
from trainer.evaluation.ranking import EmbeddingScorer, EvalBatch, evaluate

CHUNK_ELEMS = 1 << 24  # evaluate's default: scores per chunk


def plain(weight: torch.Tensor, queries: torch.Tensor, k: int, batch: int) -> float:
    """Seconds for matmul + topk of every query batch, chunk by chunk, merging the chunks' top-k."""
    t0 = time.perf_counter()
    for q in queries.split(batch):
        step = max(1, CHUNK_ELEMS // q.shape[0])
        best = None
        for lo in range(0, weight.shape[0], step):
            v, i = (q @ weight[lo : lo + step].T).topk(k, dim=1)
            best = (v, i + lo) if best is None else tuple(x for x in _merge(best, (v, i + lo), k))
    return time.perf_counter() - t0


def _merge(a, b, k):
    v, i = torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1)
    top = v.topk(k, dim=1).indices
    return v.gather(1, top), i.gather(1, top)


def ours(weight: torch.Tensor, queries: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor, k: int,
         batch: int) -> float:
    scorer = EmbeddingScorer(0, weight)
    batches = [EvalBatch(q, t, s) for q, t, s in zip(queries.split(batch), targets.split(batch), seen.split(batch))]
    t0 = time.perf_counter()
    evaluate(scorer, batches, [1, 10, k], weight.shape[1], exclude_seen=True)
    return time.perf_counter() - t0


def compare(items: int, queries: int, dim: int = 64, k: int = 100, seen: int = 50,
            batch: int = 512) -> dict[str, Any]:
    """Ours (exact ranks, ties, seen excluded, top-k) over plain matmul + topk, same rows, one process."""
    torch.manual_seed(0)
    weight = torch.randn(items + 1, dim) * 0.1  # (N + 1, D), row 0 padding
    weight[0] = 0
    q = torch.randn(queries, dim)
    targets = torch.randint(1, items + 1, (queries,))
    seen_ids = torch.randint(1, items + 1, (queries, seen))
    floor = plain(weight, q, k, batch)
    mine = ours(weight, q, targets, seen_ids, k, batch)
    return {"items": items, "queries": queries, "dim": dim, "seen_per_query": seen, "k": k, "batch": batch,
            "threads": torch.get_num_threads(), "plain_queries_per_s": round(queries / floor, 2),
            "eval_queries_per_s": round(queries / mine, 2), "eval_vs_matmul_topk": round(floor / mine, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=2048)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seen", type=int, default=50, help="seen items per query (excluded)")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch", type=int, default=512, help="queries per step (eval.batch_size)")
    p.add_argument("--out", default="benchmarks/results/ranking-cpu.json")
    a = p.parse_args()
    load = os.getloadavg()
    result = {
        "benchmark": "full-catalogue ranking (exact, seen excluded) vs plain matmul + topk, same chunks, 1 process",
        **compare(a.items, a.queries, a.dim, a.k, a.seen, a.batch), "target": ">= 0.8", **provenance(load),
    }
    write_result(result, a.out)


if __name__ == "__main__":
    main()
