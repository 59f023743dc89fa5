"""Next-item losses over item embeddings supplied from outside.

`next_item_loss` picks the training positions, draws negatives and looks every id up through
one `embed` callable (an nn.Embedding here, the sharded TorchRec table in the trainer), so the
single-process and distributed paths share the same code.

Log-Q correction (sampled softmax). With M shared negatives drawn from Q, the full softmax
partition sum_j exp(s_j) is estimated by exp(s_pos) + sum_m exp(s_m - log(M Q(m))), so each
sampled logit is corrected by log(M Q(item)) and the positive is not. In-batch negatives are
the other rows' positives, drawn from the popularity distribution P: corrected by log(N P(item)).
When both sets are used their two estimates are averaged (a further log 2 on each).
Negatives equal to the row's positive ("accidental hits") are masked with -inf.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from model.config import LossConfig

Embed = Callable[[torch.Tensor], torch.Tensor]  # ids (...) -> embeddings (..., D)


class NegativeSampler:
    """Draws item ids from 1..num_items, uniformly or in proportion to counts, with log Q.

    Inverse-CDF sampling (searchsorted), so it works for any catalogue size.
    """

    def __init__(self, num_items: int, kind: str = "uniform", counts: Optional[torch.Tensor] = None) -> None:
        self.num_items = num_items
        self.kind = kind
        # Popularity over ids 0..num_items; index 0 (padding) has probability 0.
        if counts is not None:
            if counts.shape != (num_items + 1,):
                raise ValueError(f"counts must have shape ({num_items + 1},), got {tuple(counts.shape)}")
            pop = counts.double().clone()
            pop[1:] += 1.0  # never let an item have zero probability
            pop[0] = 0.0
        else:
            pop = torch.ones(num_items + 1, dtype=torch.float64)
            pop[0] = 0.0
        self.popularity = pop / pop.sum()  # (I+1,)
        self._cdf = self.popularity.cumsum(0) if kind == "popularity" else None
        if kind not in ("uniform", "popularity"):
            raise ValueError(f"unknown sampler {kind!r}")

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self._cdf is None:
            return torch.randint(1, self.num_items + 1, (n,), generator=generator)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return torch.searchsorted(self._cdf, u, right=True).clamp_(1, self.num_items)

    def log_q(self, ids: torch.Tensor) -> torch.Tensor:
        """log probability that the sampler draws `ids`."""
        if self._cdf is None:
            return torch.full(ids.shape, -torch.log(torch.tensor(float(self.num_items))).item())
        return self.popularity[ids.cpu()].log().float().to(ids.device)

    def log_popularity(self, ids: torch.Tensor) -> torch.Tensor:
        """log P(item), the in-batch negative distribution."""
        return self.popularity[ids.cpu()].log().float().to(ids.device)


def sampled_softmax(
    query: torch.Tensor,  # (N, D)
    pos_ids: torch.Tensor,  # (N,)
    pos_emb: torch.Tensor,  # (N, D)
    neg_ids: torch.Tensor,  # (M,)
    neg_emb: torch.Tensor,  # (M, D)
    neg_logq: Optional[torch.Tensor] = None,  # (M,) log Q; None disables the correction
    pos_logp: Optional[torch.Tensor] = None,  # (N,) log P for in-batch correction
    in_batch: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor:
    pos_logit = (query * pos_emb).sum(-1, keepdim=True) / temperature  # (N, 1)
    neg_logit = query @ neg_emb.T / temperature  # (N, M)
    sets = 2 if in_batch else 1
    if neg_logq is not None:
        neg_logit = neg_logit - (neg_logq + torch.log(torch.tensor(float(sets * neg_ids.numel())))).to(neg_logit)
    neg_logit = neg_logit.masked_fill(neg_ids[None, :] == pos_ids[:, None], float("-inf"))
    logits = [pos_logit, neg_logit]
    if in_batch:
        batch_logit = query @ pos_emb.T / temperature  # (N, N)
        if pos_logp is not None:
            n = float(sets * pos_ids.numel())
            batch_logit = batch_logit - (pos_logp + torch.log(torch.tensor(n))).to(batch_logit)
        # own positive (the diagonal) and other rows with the same item are not negatives
        batch_logit = batch_logit.masked_fill(pos_ids[None, :] == pos_ids[:, None], float("-inf"))
        logits.append(batch_logit)
    logits = torch.cat(logits, dim=1).float()  # (N, 1 + M [+ N])
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def bce(query: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor) -> torch.Tensor:
    """The paper's loss: -log s(q.p) - log(1 - s(q.n)), one negative per row. All (N, D)."""
    pos = (query * pos_emb).sum(-1).float()
    neg = (query * neg_emb).sum(-1).float()
    return (F.softplus(-pos) + F.softplus(neg)).mean()


def bpr(query: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor) -> torch.Tensor:
    """-log s(q.p - q.n), one negative per row. All (N, D)."""
    return F.softplus(-((query * pos_emb).sum(-1) - (query * neg_emb).sum(-1)).float()).mean()


def training_rows(hidden: torch.Tensor, targets: torch.Tensor, positions: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the (query, target) pairs that carry a loss.

    hidden: (B, L, D); targets: (B, L) next item at each position, 0 where there is none.
    positions: 'all' (every position with a target) or 'last' (only the final position).
    Returns query (N, D) and target ids (N,).
    """
    if positions == "last":
        hidden, targets = hidden[:, -1:], targets[:, -1:]
    mask = targets != 0  # (B, L')
    return hidden[mask], targets[mask]


def next_item_loss(
    cfg: LossConfig,
    hidden: torch.Tensor,  # (B, L, D)
    targets: torch.Tensor,  # (B, L)
    embed: Embed,
    sampler: NegativeSampler,
    positions: str = "all",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Mean next-item loss. Calls `embed` exactly once, even for a batch with no targets, because
    a sharded table's lookup is a collective that every rank must join the same number of times."""
    query, pos_ids = training_rows(hidden, targets, positions)  # (N, D), (N,)
    n = pos_ids.numel()
    if n == 0:
        neg_ids = sampler.sample(1, generator).to(pos_ids.device)
        # zero, but connected to every parameter so gradient all-reduces see the same graph on all ranks
        return (hidden.sum() + embed(neg_ids).sum()) * 0.0
    if cfg.type == "sampled_softmax":
        neg_ids = sampler.sample(cfg.num_negatives, generator).to(pos_ids.device)  # (M,)
        emb = embed(torch.cat([pos_ids, neg_ids]))  # one lookup for both
        pos_emb, neg_emb = emb[:n], emb[n:]
        correct = cfg.logq_correction
        return sampled_softmax(
            query,
            pos_ids,
            pos_emb,
            neg_ids,
            neg_emb,
            neg_logq=sampler.log_q(neg_ids) if correct else None,
            pos_logp=sampler.log_popularity(pos_ids) if correct and cfg.in_batch_negatives else None,
            in_batch=cfg.in_batch_negatives,
            temperature=cfg.temperature,
        )
    neg_ids = sampler.sample(n, generator).to(pos_ids.device)  # (N,): one negative per row
    emb = embed(torch.cat([pos_ids, neg_ids]))
    fn = bce if cfg.type == "bce" else bpr
    return fn(query, emb[:n], emb[n:])
