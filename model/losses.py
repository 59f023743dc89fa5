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

Static shapes, no host syncs. The loss rows are fixed by the batch's shape, not by its content: every position
(B*L rows) for positions='all', the last one (B rows) for 'last'. Rows without a target (id 0) weigh 0 and,
as in-batch negatives, are masked out; the loss is the mean over the rows with a target. Nothing here reads a
tensor's value on the host (no boolean-mask indexing, no .item(), no .cpu()), so on a GPU the step never waits
for the device; the price is that padded rows are computed and thrown away (keep windows full: see
configs/long-sequence.yaml). The sampler's tables live on the device the ids are on.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from model.config import LossConfig


class NegativeSampler:
    """Draws item ids from 1..num_items, uniformly or in proportion to counts, with log Q.

    Inverse-CDF sampling (searchsorted), so it works for any catalogue size. Random numbers come from the
    caller's generator (a CPU generator: the stream is the same on every device and is checkpointed); the
    tables (popularity, CDF) live on `device`, and so do the drawn ids.
    """

    def __init__(self, num_items: int, kind: str = "uniform", counts: Optional[torch.Tensor] = None,
                 device: Optional[torch.device] = None) -> None:
        if kind not in ("uniform", "popularity"):
            raise ValueError(f"unknown sampler {kind!r}")
        self.num_items = num_items
        self.kind = kind
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._log_uniform = -math.log(num_items)
        self.popularity: Optional[torch.Tensor] = None  # (I+1,) float64, only when counts were given
        self._cdf: Optional[torch.Tensor] = None
        if counts is not None:
            if counts.shape != (num_items + 1,):
                raise ValueError(f"counts must have shape ({num_items + 1},), got {tuple(counts.shape)}")
            # Built in place: at 5x10^7 items each float64 temporary is 400 MB per worker.
            pop = counts.to(torch.float64, copy=True).cpu()  # (I+1,)
            pop[1:] += 1.0  # never let an item have zero probability
            pop[0] = 0.0  # padding
            pop /= pop.sum()
            self.popularity = pop.to(self.device)
        if kind == "popularity":
            if self.popularity is None:
                self.popularity = torch.full((num_items + 1,), 1.0 / num_items, dtype=torch.float64)
                self.popularity[0] = 0.0
                self.popularity = self.popularity.to(self.device)
            # the CDF is summed on the CPU, so a GPU run draws exactly the ids a CPU run draws
            self._cdf = self.popularity.cpu().cumsum(0).to(self.device)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self._cdf is None:
            ids = torch.randint(1, self.num_items + 1, (n,), generator=generator)
            return ids.to(self.device, non_blocking=True)
        u = torch.rand(n, generator=generator, dtype=torch.float64).to(self.device, non_blocking=True)
        return torch.searchsorted(self._cdf, u, right=True).clamp_(1, self.num_items)

    def log_q(self, ids: torch.Tensor) -> torch.Tensor:
        """log probability that the sampler draws `ids` (on the ids' device)."""
        if self._cdf is None:
            return torch.full(ids.shape, self._log_uniform, device=ids.device)
        return self.log_popularity(ids)

    def log_popularity(self, ids: torch.Tensor) -> torch.Tensor:
        """log P(item), the in-batch negative distribution (-inf for id 0); uniform without counts."""
        if self.popularity is None:
            out = torch.full(ids.shape, self._log_uniform, device=ids.device)
            return out.masked_fill_(ids == 0, -math.inf)
        return self.popularity.to(ids.device)[ids].log().float()


def _masked_mean(per_row: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the valid rows (all when None); 0 when none is. A non-finite row, valid or not, makes it
    non-finite (multiplied, not selected: padding must not hide a NaN the update would spread)."""
    if valid is None:
        return per_row.mean()
    return (per_row * valid).sum() / valid.sum().clamp(min=1)


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
    valid: Optional[torch.Tensor] = None,  # (N,) bool: rows with a target; None: all
) -> torch.Tensor:
    pos_logit = (query * pos_emb).sum(-1, keepdim=True) / temperature  # (N, 1)
    neg_logit = query @ neg_emb.T / temperature  # (N, M)
    sets = 2 if in_batch else 1
    if neg_logq is not None:
        neg_logit = neg_logit - (neg_logq + math.log(sets * neg_ids.numel())).to(neg_logit)
    neg_logit = neg_logit.masked_fill(neg_ids[None, :] == pos_ids[:, None], float("-inf"))
    logits = [pos_logit, neg_logit]
    if in_batch:
        batch_logit = query @ pos_emb.T / temperature  # (N, N)
        if pos_logp is not None:
            if valid is None:
                log_n = torch.tensor(float(sets * pos_ids.numel())).log()
            else:  # N counts the rows with a target; rows without one have no P (log 0): not used below
                log_n = (sets * valid.sum().clamp(min=1)).double().log()
                pos_logp = pos_logp.masked_fill(~valid, 0.0)
            batch_logit = batch_logit - (pos_logp + log_n).to(batch_logit)
        # own positive (the diagonal), other rows with the same item and rows without a target are not negatives
        hidden_cols = pos_ids[None, :] == pos_ids[:, None]
        if valid is not None:
            hidden_cols = hidden_cols | ~valid[None, :]
        batch_logit = batch_logit.masked_fill(hidden_cols, float("-inf"))
        logits.append(batch_logit)
    logits = torch.cat(logits, dim=1).float()  # (N, 1 + M [+ N])
    return _masked_mean(-F.log_softmax(logits, dim=1)[:, 0], valid)


def full_softmax(
    query: torch.Tensor,  # (R, D)
    pos_ids: torch.Tensor,  # (R,) item ids 1..N, 0 where a row has no target
    item_emb: torch.Tensor,  # (N, D) items 1..N in id order
    temperature: float = 1.0,
    valid: Optional[torch.Tensor] = None,  # (R,) bool
) -> torch.Tensor:
    """Cross-entropy of each row's positive against every item: the sampled softmax with every item as a
    negative (the positive's own column masked) is this, computed as one (R, N) logit matrix and a fused
    log-softmax, without the mask, the concatenation and their (R, N) copies (the loss's forward+backward took
    1.6 s against 3.0 s at 12,800 x 3,706 on one thread)."""
    logits = (query / temperature) @ item_emb.T  # (R, N)
    per_row = F.cross_entropy(logits.float(), (pos_ids - 1).clamp(min=0), reduction="none")  # (R,)
    return _masked_mean(per_row, valid)


def bce(query: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor,
        valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The paper's loss: -log s(q.p) - log(1 - s(q.n)), one negative per row. All (N, D)."""
    pos = (query * pos_emb).sum(-1).float()
    neg = (query * neg_emb).sum(-1).float()
    return _masked_mean(F.softplus(-pos) + F.softplus(neg), valid)


def bpr(query: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor,
        valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """-log s(q.p - q.n), one negative per row. All (N, D)."""
    return _masked_mean(F.softplus(-((query * pos_emb).sum(-1) - (query * neg_emb).sum(-1)).float()), valid)


def _loss_positions(targets: torch.Tensor, positions: str) -> torch.Tensor:
    """(B, L) bool: positions that carry a loss. 'all': every position with a target; 'last': the final one."""
    mask = targets != 0
    if positions == "last":
        mask = mask & (torch.arange(targets.shape[1], device=targets.device) == targets.shape[1] - 1)
    return mask


@dataclass
class LossIds:
    """The items a loss needs, drawn before any lookup so a trainer can fetch them in one collective.

    Shapes depend on the batch's shape only: R = B*L loss rows for positions='all', R = B for 'last'.
    """

    mask: torch.Tensor  # (B, L) positions with a loss (for inspection; the loss uses `pos_ids` != 0)
    pos_ids: torch.Tensor  # (R,) the target at every loss row, 0 where there is none
    neg_ids: torch.Tensor  # (M,) shared, or (R,) one per row
    positions: str = "all"

    @property
    def all(self) -> torch.Tensor:
        return torch.cat([self.pos_ids, self.neg_ids])  # (R + M,)

    @property
    def valid(self) -> torch.Tensor:
        return self.pos_ids != 0  # (R,) rows with a target

    @property
    def events(self) -> torch.Tensor:
        """The number of target events, a 0-d tensor on the ids' device (not read on the host)."""
        return self.valid.sum()

    def queries(self, hidden: torch.Tensor) -> torch.Tensor:
        """The loss rows of hidden (B, L, D) -> (R, D)."""
        return hidden.reshape(-1, hidden.shape[-1]) if self.positions == "all" else hidden[:, -1]


def sample_loss_ids(
    cfg: LossConfig, targets: torch.Tensor, sampler: NegativeSampler, positions: str = "all",
    generator: Optional[torch.Generator] = None,
) -> LossIds:
    mask = _loss_positions(targets, positions)
    pos_ids = (targets if positions == "all" else targets[:, -1]).reshape(-1)  # (R,)
    if cfg.type == "full_softmax":  # every item, in id order: the logits of full_softmax
        return LossIds(mask, pos_ids, torch.arange(1, sampler.num_items + 1, device=targets.device), positions)
    # Even a batch without targets asks for negatives: a sharded lookup is a collective every rank joins.
    count = cfg.num_negatives if cfg.type == "sampled_softmax" else max(pos_ids.numel(), 1)
    return LossIds(mask, pos_ids, sampler.sample(count, generator).to(targets.device), positions)


def item_vectors(cfg: LossConfig, emb: torch.Tensor) -> torch.Tensor:
    """Item rows as the loss scores them: L2-normalised when `normalize` (row 0, all zeros, stays zero). A
    query's norm does not change its ranking, so ranking by these rows is ranking by the training logits."""
    return F.normalize(emb, dim=-1) if cfg.normalize else emb


def loss_from_embeddings(
    cfg: LossConfig, hidden: torch.Tensor, ids: LossIds, emb: torch.Tensor, sampler: NegativeSampler
) -> torch.Tensor:
    """hidden (B, L, D); emb (R + M, D): the embeddings of `ids.all`, in that order.

    The mean over rows with a target; exactly 0 for a batch without any, but connected to every parameter and
    embedding either way, so gradient collectives see the same graph on all ranks.
    """
    r = ids.pos_ids.numel()
    if r == 0:
        return (hidden.sum() + emb.sum()) * 0.0
    query = ids.queries(hidden)  # (R, D)
    if cfg.normalize:
        query, emb = F.normalize(query, dim=-1), item_vectors(cfg, emb)
    valid = ids.valid
    pos_emb, neg_emb = emb[:r], emb[r:]
    if cfg.type == "full_softmax":
        return full_softmax(query, ids.pos_ids, neg_emb, cfg.temperature, valid)
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
            valid=valid,
        )
    fn = bce if cfg.type == "bce" else bpr
    return fn(query, pos_emb, neg_emb, valid)
