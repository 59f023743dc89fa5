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
    torch.manual_seed(0)
    weight = torch.randn(a.items + 1, a.dim) * 0.1  # (N + 1, D), row 0 padding
    weight[0] = 0
    queries = torch.randn(a.queries, a.dim)
    targets = torch.randint(1, a.items + 1, (a.queries,))
    seen = torch.randint(1, a.items + 1, (a.queries, a.seen))
    load = os.getloadavg()
    floor = plain(weight, queries, a.k, a.batch)
    mine = ours(weight, queries, targets, seen, a.k, a.batch)
    result = {
        "benchmark": "full-catalogue ranking (exact, seen excluded) vs plain matmul + topk, same chunks, 1 process",
        "items": a.items, "queries": a.queries, "dim": a.dim, "seen_per_query": a.seen, "k": a.k,
        "batch": a.batch, "threads": torch.get_num_threads(),
        "plain_queries_per_s": round(a.queries / floor, 1), "eval_queries_per_s": round(a.queries / mine, 1),
        "eval_vs_matmul_topk": round(floor / mine, 3), "target": ">= 0.8",
        **provenance(load),
    }
    write_result(result, a.out)


if __name__ == "__main__":
    main()
