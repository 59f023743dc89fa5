"""Distributed full-catalogue ranking on the held-out day.

Every rank holds a block of full-width item rows [start, stop) (`ShardedItemTable.row_block`:
row-wise shards as they are; table- and column-wise tables redistributed into an even row split,
because a column shard alone cannot score an item). Per batch of queries:

1. all-gather the queries (B_r, D) of every rank -> (Q, D), with targets and seen lists;
2. the target's score: its owner computes it, an all-reduce (sum of one non-zero) shares it;
3. each rank scores all Q queries against its rows in chunks, counting the items ranked ahead
   of the target and keeping its own top-k;
4. all-reduce the counts -> exact rank; all-gather the top-k lists and merge -> global top-k.
Queries are small (Q x D) and the table is large, so moving queries is the cheap direction;
no rank ever holds the whole table or a (Q, num_items) score matrix.

Order and ties: items are ordered by (score descending, item id ascending), a total order, so
rank = 1 + #{items with a higher score} + #{items with an equal score and a smaller id}, and the
target is in the top-k exactly when rank <= k. Ties therefore cost the target (vs. the optimistic
"1 + strictly higher") only against smaller ids; a constant scorer ranks by id, not at 1.
Excluded items (padding row 0 always; a query's already-seen items when asked, except its own
target) score -inf and are never ahead of the target; in top-k lists they appear as id -1. A target outside
the table (the vocabulary's out-of-vocabulary id) ranks after every item: a miss.

Every function here is a collective: all ranks call it with the same number of batches. Query
computation uses table lookups (also collectives): every rank takes the same number of batches (`padded`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Protocol, Sequence

import torch
import torch.distributed as dist

from trainer.distributed.collectives import all_gather_rows, all_reduce, comm_device, gather_cols
from trainer.evaluation.metrics import MetricSums

NEG_INF = float("-inf")


@dataclass
class EvalBatch:
    """One rank's queries. Id lists are padded with 0 (never an item)."""

    queries: torch.Tensor  # (B, D) user representations
    targets: torch.Tensor  # (B,) held-out item ids, >= 1
    seen: Optional[torch.Tensor] = None  # (B, S) items to exclude (when exclude_seen)
    relevant: Optional[torch.Tensor] = None  # (B, R) all of the held-out day's items, for recall

    @classmethod
    def empty(cls, dim: int, device: Optional[torch.device] = None) -> "EvalBatch":
        device = device or comm_device()
        return cls(torch.zeros(0, dim, device=device), torch.zeros(0, dtype=torch.long, device=device))


class Scorer(Protocol):
    """Scores queries against this rank's items [start, stop)."""

    start: int
    stop: int

    def scores(self, queries: torch.Tensor, lo: int, hi: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(Q, D) -> (Q, hi - lo) for items lo..hi-1, start <= lo < hi <= stop; into `out` when the scorer can
        (a reused buffer: a fresh 64 MB result per chunk costs a third of the matmul in page faults)."""
        ...

    def pair_scores(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(N, D), (N,) ids in [start, stop) -> (N,) score of each query with its item."""
        ...


class EmbeddingScorer:
    """Dot products against full-width rows `weight` = items start..start+n-1, in fp32."""

    def __init__(self, start: int, weight: torch.Tensor) -> None:
        self.start, self.stop = start, start + weight.shape[0]
        self.weight = weight.float()  # (n, D)

    def scores(self, queries: torch.Tensor, lo: int, hi: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = self.weight[lo - self.start : hi - self.start]  # (n, D)
        if out is None:
            return queries.float() @ rows.T
        return torch.matmul(queries.float(), rows.T, out=out)

    def pair_scores(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return (queries.float() * self.weight[ids - self.start]).sum(-1)


class PopularityScorer:
    """Every query scores item i by its training-window count (float64: exact for any count)."""

    def __init__(self, counts: torch.Tensor, start: int, stop: int) -> None:
        self.counts = counts.double()  # (num_items + 1,)
        self.start, self.stop = start, stop

    def scores(self, queries: torch.Tensor, lo: int, hi: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.counts[lo:hi].expand(queries.shape[0], -1)

    def pair_scores(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.counts[ids]


# ---------------------------------------------------------------- top-k under the total order


def order_topk(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best k of each row by (value desc, id asc). values, ids: (Q, M) -> (Q, min(k, M))."""
    by_id = ids.argsort(dim=1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    by_value = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_value), ids.gather(1, by_value)


def chunk_topk(scores: torch.Tensor, lo: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of (Q, n) scores for items lo..lo+n-1 under the total order, exact at tied boundaries.

    torch.topk may keep any of several items tied with the k-th value; we keep the smallest ids.
    """
    q, n = scores.shape
    if n <= k:
        return order_topk(scores, torch.arange(lo, lo + n, device=scores.device).expand(q, n), k)
    values, cols = scores.topk(k + 1, dim=1)  # (Q, k + 1)
    # Exact as it is unless the item after the k-th ties with it (rare with float scores): then every item at
    # the k-th value is in, and sorting the k by (value desc, id asc) is the total order.
    if bool((values[:, k] < values[:, k - 1]).all()):
        return order_topk(values[:, :k], cols[:, :k] + lo, k)
    kth = values[:, k - 1 : k]  # (Q, 1)
    ids = torch.arange(lo, lo + n, device=scores.device).expand(q, n)
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(1, keepdim=True)  # tied slots left
    keep = above | (tied & (tied.cumsum(1) <= room))  # exactly k per row
    cols = keep.nonzero()[:, 1].view(q, k)  # row-major, so rows stay together
    return order_topk(scores.gather(1, cols), ids.gather(1, cols), k)


GROUP = 8  # items per group of the top-k filter (columns c, c + n/8, ...: a strided max, one pass)
SPARE = 16  # groups a row may still take from a chunk before the exact top-k runs instead


def update_topk(top: Optional[tuple[torch.Tensor, torch.Tensor]], scores: torch.Tensor, lo: int,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top-k (values (Q, k) float64, ids (Q, k)) of earlier chunks, all of smaller ids, merged with
    this chunk's (Q, n) scores for items lo..lo+n-1, under the total order.

    After the first chunks few items beat a row's running k-th value tau, and an item of this chunk that only
    ties tau ranks after it (larger id). So the chunk's columns are split into groups, each group's maximum
    taken, and a row with at most SPARE groups above its tau merges only those groups' items: exact, and a
    fraction of a full top-k's cost. The other rows (early chunks, rows still at -inf) take the chunk's exact
    top-k.
    """
    q, n = scores.shape
    if top is None or top[0].shape[1] != k or n % GROUP or n // GROUP <= SPARE:
        return _merge_exact(top, scores, lo, k)
    width = n // GROUP
    best, groups = scores.view(q, GROUP, width).amax(1).topk(SPARE + 1, dim=1)  # (Q, SPARE + 1)
    served = best[:, SPARE].double() <= top[0][:, k - 1]  # (Q,) every group above tau is in hand
    # the groups' columns in ascending order (group c holds c, c + width, ...; groups sorted, offset outer),
    # after the running list's smaller ids: one stable sort by value is then the total order
    offsets = width * torch.arange(GROUP, device=scores.device)
    cols = (offsets[None, :, None] + groups[:, :SPARE].sort(dim=1).values[:, None, :]).reshape(q, -1)
    values, ids = _stable_merge(top, scores.gather(1, cols), cols + lo, k)  # from k + SPARE * GROUP
    if not bool(served.all()):
        rows = (~served).nonzero().squeeze(1)
        values[rows], ids[rows] = _merge_exact((top[0][rows], top[1][rows]), scores[rows], lo, k)
    return values, ids


def _merge_exact(top: Optional[tuple[torch.Tensor, torch.Tensor]], scores: torch.Tensor, lo: int,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    cs, ci = chunk_topk(scores, lo, k)
    if top is None:
        return cs.double(), ci
    return _stable_merge(top, cs, ci, k)


def _stable_merge(top: tuple[torch.Tensor, torch.Tensor], values: torch.Tensor, ids: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k of the running list and (Q, m) candidates whose ids are all larger and ascending within
    equal values: a stable sort by value alone is then the total order."""
    cat_s, cat_i = torch.cat([top[0], values.double()], 1), torch.cat([top[1], ids], 1)
    keep = cat_s.argsort(dim=1, descending=True, stable=True)[:, :k]
    return cat_s.gather(1, keep), cat_i.gather(1, keep)


# ---------------------------------------------------------------- ranking


@dataclass
class RankResult:
    ranks: torch.Tensor  # (B,) 1-based rank of each local query's target
    topk_ids: torch.Tensor  # (B, k) best first; -1 for excluded/empty slots
    topk_scores: torch.Tensor  # (B, k)


def rank_batch(scorer: Scorer, batch: EvalBatch, k: int, exclude_seen: bool = False,
               max_chunk_elems: int = 1 << 24) -> RankResult:
    """Exact ranks and top-k for this rank's queries, scoring all ranks' queries. Collective."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    me = dist.get_rank() if dist.is_initialized() else 0
    dev = comm_device()
    b = batch.queries.shape[0]
    if b and int(batch.targets.min()) < 1:
        raise ValueError("targets must be item ids >= 1 (0 is padding)")
    seen_w = batch.seen.shape[1] if exclude_seen and batch.seen is not None else 0
    info = torch.zeros(4, world, dtype=torch.long, device=dev)  # per rank: batch size, seen width, item range
    info[:, me] = torch.tensor([b, seen_w, scorer.start, scorer.stop])
    sizes, widths, starts, stops = all_reduce(info).tolist()
    _check_tiling(starts, stops)
    num_rows = max(stops)
    width, offset = max(widths), sum(sizes[:me])

    queries = all_gather_rows(batch.queries.float().to(dev), sizes)  # (Q, D)
    targets = all_gather_rows(batch.targets.long().to(dev), sizes)  # (Q,)
    seen = all_gather_rows(_pad_cols(batch.seen if exclude_seen else None, b, width, dev), sizes)  # (Q, S)
    total = queries.shape[0]

    # 2. the target's score, from its owner
    owned = (targets >= scorer.start) & (targets < scorer.stop)
    target_score = torch.zeros(total, dtype=torch.float64, device=dev)
    if owned.any():
        target_score[owned] = scorer.pair_scores(queries[owned], targets[owned]).double()
    all_reduce(target_score)

    # 3. this rank's items, in chunks of at most max_chunk_elems scores
    ahead = torch.zeros(total, dtype=torch.long, device=dev)
    top: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    step = max(1, max_chunk_elems // max(total, 1))
    width_max = min(step, max(scorer.stop - scorer.start, 0))
    buf = torch.empty(total, width_max, device=dev)  # see _count
    out = torch.empty(total * width_max, device=dev)  # the chunk's scores, contiguous at any width
    t = below = None  # the target's score in the chunks' dtype, and the next float below it
    for lo in range(scorer.start, scorer.stop, step):
        hi = min(lo + step, scorer.stop)
        if total == 0:
            break
        s = scorer.scores(queries, lo, hi, out=out[: total * (hi - lo)].view(total, hi - lo)).contiguous()  # (Q, n)
        if lo == 0:
            s[:, 0] = NEG_INF  # padding row
        if width:
            _mask_seen(s, seen, targets, lo, hi)
        if t is None or t.dtype != s.dtype:
            t = target_score.to(s.dtype)  # (Q,)
            below = torch.nextafter(t, torch.full_like(t, NEG_INF))
        # Ties go to the smaller id: against a chunk of smaller ids only (target >= hi) an equal score is
        # ahead, so compare with the next float below t; elsewhere strictly. One pass over the chunk.
        ahead += _count(torch.gt, s, torch.where(targets >= hi, below, t)[:, None], buf)
        # rows whose target is in this chunk: not against itself (its chunk score may differ from t by an
        # ulp), and the items tied with it that have smaller ids
        inside = (targets >= lo) & (targets < hi)  # (Q,)
        own = s.gather(1, (targets - lo).clamp(0, hi - lo - 1)[:, None]).squeeze(1)  # (Q,)
        ahead -= (inside & (own > t)).long()
        if bool(inside.any()):
            rows = inside.nonzero().squeeze(1)
            ids = torch.arange(lo, hi, device=dev)[None, :]  # (1, n)
            ahead[rows] += ((s[rows] == t[rows, None]) & (ids < targets[rows, None])).sum(1)
        top = update_topk(top, s, lo, k)
    top_s, top_i = top if top is not None else (None, None)

    # 4. combine across ranks
    all_reduce(ahead)
    local_s = torch.full((total, k), NEG_INF, dtype=torch.float64, device=dev)
    local_i = torch.full((total, k), -1, dtype=torch.long, device=dev)
    if top_s is not None:
        local_s[:, : top_s.shape[1]], local_i[:, : top_i.shape[1]] = top_s, top_i  # type: ignore[index]
    all_s, all_i = gather_cols(local_s, world), gather_cols(local_i, world)  # (Q, W*k)
    top_s, top_i = order_topk(all_s, all_i, k)
    top_i = top_i.masked_fill(top_s == NEG_INF, -1)
    ranks = torch.where(targets >= num_rows, num_rows, 1 + ahead)  # out of vocabulary: after every item
    mine = slice(offset, offset + b)
    return RankResult(ranks=ranks[mine], topk_ids=top_i[mine], topk_scores=top_s[mine])


def _pad_cols(x: Optional[torch.Tensor], rows: int, width: int, device: torch.device) -> torch.Tensor:
    out = torch.zeros(rows, width, dtype=torch.long, device=device)
    if x is not None and x.numel():
        out[:, : x.shape[1]] = x
    return out


def _count(compare, s: torch.Tensor, t: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """(Q, n) scores, (Q, 1) thresholds -> (Q,) int64 count of compare(s, t) per row (torch.gt, torch.eq). The
    comparison is written as 0/1 into a float buffer and summed: several times faster on CPU than summing a
    bool tensor or count_nonzero, and exact (a chunk holds at most 2^24 scores)."""
    out = buf[:, : s.shape[1]]
    compare(s, t, out=out)
    return out.sum(1).long()


def _check_tiling(starts: list[int], stops: list[int]) -> None:
    """The ranks' item ranges must tile [0, N) exactly, or items would be counted twice or never."""
    ranges = sorted((a, z) for a, z in zip(starts, stops) if z > a)
    edge = 0
    for a, z in ranges:
        if a != edge:
            raise ValueError(f"scorer item ranges {list(zip(starts, stops))} overlap or leave a gap")
        edge = z


def _mask_seen(s: torch.Tensor, seen: torch.Tensor, targets: torch.Tensor, lo: int, hi: int) -> None:
    """-inf at each query's seen items within [lo, hi), except the query's own target."""
    inside = (seen >= lo) & (seen < hi) & (seen != 0) & (seen != targets[:, None])  # (Q, S)
    rows = torch.arange(s.shape[0], device=s.device)[:, None].expand_as(seen)
    s[rows[inside], seen[inside] - lo] = NEG_INF


def evaluate(scorer: Scorer, batches: Iterable[Optional[EvalBatch]], ks: Sequence[int], dim: int,
             exclude_seen: bool = False, max_chunk_elems: int = 1 << 24) -> dict[str, float]:
    """HR@k, NDCG@k, MRR and recall@k over all ranks' queries; the same dict on every rank.

    `batches` must have the same length on every rank (None = an empty batch; see `padded`).
    """
    k = max(ks)
    sums = MetricSums(ks)
    for batch in batches:
        batch = batch if batch is not None else EvalBatch.empty(dim)
        result = rank_batch(scorer, batch, k, exclude_seen, max_chunk_elems)
        sums.add_ranks(result.ranks)
        if batch.relevant is not None:
            sums.add_recall(result.topk_ids, batch.relevant)
    return reduce_sums(sums).means()


def reduce_sums(sums: MetricSums) -> MetricSums:
    """Sum every rank's MetricSums (collective; names must match across ranks)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return sums
    names: list[Optional[list[str]]] = [None] * dist.get_world_size()
    dist.all_gather_object(names, sorted(sums.sums))
    all_names = sorted(set().union(*[set(n or []) for n in names]))
    vec = torch.tensor([[sums.sums.get(n, 0.0), float(sums.counts.get(n, 0))] for n in all_names],
                       dtype=torch.float64, device=comm_device()).reshape(-1, 2)
    dist.all_reduce(vec)
    out = MetricSums(sums.ks)
    for n, (total, count) in zip(all_names, vec.cpu().tolist()):
        out.sums[n], out.counts[n] = total, int(count)
    return out
