"""Next-item losses over item embeddings supplied from outside.

`sample_loss_ids` picks the training positions and draws negatives before any lookup, so a caller can
fetch every id it needs in one lookup (an nn.Embedding, or the sharded TorchRec table in the trainer);
`loss_from_embeddings` then computes the loss from those embeddings. Single-process and distributed
paths share the same code.

Log-Q correction (sampled softmax). With M shared negatives drawn from Q, the full softmax
partition sum_j exp(s_j) is estimated by exp(s_pos) + sum_m exp(s_m - log(M Q(m))), so each
sampled logit is corrected by log(M Q(item)) and the positive is not. In-batch negatives are
the other rows' positives, drawn from the popularity distribution P: corrected by log(N P(item)).
When both sets are used their two estimates are averaged (a further log 2 on each).
Negatives equal to the row's positive ("accidental hits") are masked with -inf.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from model.config import LossConfig


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


def _loss_positions(targets: torch.Tensor, positions: str) -> torch.Tensor:
    """(B, L) bool: positions that carry a loss. 'all': every position with a target; 'last': the final one."""
    mask = targets != 0
    if positions == "last":
        mask = mask & (torch.arange(targets.shape[1], device=targets.device) == targets.shape[1] - 1)
    return mask


@dataclass
class LossIds:
    """The items a loss needs, drawn before any lookup so a trainer can fetch them in one collective."""

    mask: torch.Tensor  # (B, L) positions with a loss
    pos_ids: torch.Tensor  # (N,)
    neg_ids: torch.Tensor  # (M,) shared, or (N,) one per row; one dummy id when N == 0

    @property
    def all(self) -> torch.Tensor:
        return torch.cat([self.pos_ids, self.neg_ids])  # (N + M,)


def sample_loss_ids(
    cfg: LossConfig, targets: torch.Tensor, sampler: NegativeSampler, positions: str = "all",
    generator: Optional[torch.Generator] = None,
) -> LossIds:
    mask = _loss_positions(targets, positions)
    pos_ids = targets[mask]
    n = pos_ids.numel()
    # A batch without targets still asks for one id: a sharded lookup is a collective every rank joins.
    count = 1 if n == 0 else (cfg.num_negatives if cfg.type == "sampled_softmax" else n)
    return LossIds(mask, pos_ids, sampler.sample(count, generator).to(targets.device))


def loss_from_embeddings(
    cfg: LossConfig, hidden: torch.Tensor, ids: LossIds, emb: torch.Tensor, sampler: NegativeSampler
) -> torch.Tensor:
    """hidden (B, L, D); emb (N + M, D): the embeddings of `ids.all`, in that order."""
    query = hidden[ids.mask]  # (N, D)
    n = ids.pos_ids.numel()
    if n == 0:
        # zero, but connected to every parameter so gradient all-reduces see the same graph on all ranks
        return (hidden.sum() + emb.sum()) * 0.0
    pos_emb, neg_emb = emb[:n], emb[n:]
    if cfg.type == "sampled_softmax":
        correct = cfg.logq_correction
        return sampled_softmax(
            query,
            ids.pos_ids,
            pos_emb,
            ids.neg_ids,
            neg_emb,
            neg_logq=sampler.log_q(ids.neg_ids) if correct else None,
            pos_logp=sampler.log_popularity(ids.pos_ids) if correct and cfg.in_batch_negatives else None,
            in_batch=cfg.in_batch_negatives,
            temperature=cfg.temperature,
        )
    fn = bce if cfg.type == "bce" else bpr
    return fn(query, pos_emb, neg_emb)
