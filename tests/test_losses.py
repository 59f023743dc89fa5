"""Each loss on a tiny case computed by hand, and the log-Q correction against its formula."""

import math

import pytest
import torch

from model.config import LossConfig
from model.losses import NegativeSampler, bce, bpr, full_softmax, sample_loss_ids, sampled_softmax
from tests.helpers import next_item_loss


def test_bce_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[2.0, 0.0]])  # score 2
    n = torch.tensor([[-1.0, 0.0]])  # score -1
    expected = -math.log(1 / (1 + math.exp(-2))) - math.log(1 - 1 / (1 + math.exp(1)))
    assert bce(q, p, n).item() == pytest.approx(expected, rel=1e-6)


def test_bpr_by_hand():
    q = torch.tensor([[1.0, 1.0]])
    p = torch.tensor([[1.0, 0.5]])  # 1.5
    n = torch.tensor([[0.5, 0.0]])  # 0.5
    assert bpr(q, p, n).item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))), rel=1e-6)


def test_sampled_softmax_plain_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    pos_emb = torch.tensor([[1.0, 0.0]])  # s=1
    neg_emb = torch.tensor([[0.0, 1.0], [2.0, 0.0]])  # s=0, s=2
    loss = sampled_softmax(q, torch.tensor([5]), pos_emb, torch.tensor([7, 8]), neg_emb)
    expected = -(1 - math.log(math.exp(1) + math.exp(0) + math.exp(2)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_logq_correction_formula():
    # corrected negative logit = s - log(M * Q(item)); the positive is not corrected
    q = torch.tensor([[1.0, 0.0]])
    pos_emb = torch.tensor([[0.5, 0.0]])
    neg_emb = torch.tensor([[0.2, 0.0], [0.9, 0.0], [0.1, 0.0]])
    logq = torch.log(torch.tensor([0.5, 0.1, 0.01]))
    loss = sampled_softmax(q, torch.tensor([1]), pos_emb, torch.tensor([2, 3, 4]), neg_emb, neg_logq=logq)
    m = 3
    negs = [0.2 - math.log(m * 0.5), 0.9 - math.log(m * 0.1), 0.1 - math.log(m * 0.01)]
    expected = -(0.5 - math.log(math.exp(0.5) + sum(math.exp(v) for v in negs)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_logq_estimator_approaches_full_softmax():
    # The corrected sampled loss is a consistent estimate of full-softmax cross-entropy.
    torch.manual_seed(0)
    num_items, d = 500, 8
    items = torch.randn(num_items + 1, d)
    q = torch.randn(1, d)
    pos = torch.tensor([3])
    full = torch.nn.functional.cross_entropy(q @ items[1:].T, pos - 1).item()
    counts = torch.cat([torch.zeros(1), torch.rand(num_items) ** 3 * 100])
    sampler = NegativeSampler(num_items, "popularity", counts)
    neg = sampler.sample(200_000, torch.Generator().manual_seed(1))
    corrected = sampled_softmax(q, pos, items[pos], neg, items[neg], neg_logq=sampler.log_q(neg)).item()
    uncorrected = sampled_softmax(q, pos, items[pos], neg, items[neg]).item()
    assert abs(corrected - full) < 0.05
    assert abs(uncorrected - full) > 5 * abs(corrected - full)


def test_accidental_hits_masked():
    q = torch.tensor([[1.0, 0.0]])
    emb = torch.tensor([[1.0, 0.0]])
    # the only negative is the positive itself: masked, so the loss is -log 1 = 0
    loss = sampled_softmax(q, torch.tensor([4]), emb, torch.tensor([4]), emb)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_in_batch_negatives_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos_ids = torch.tensor([1, 2])
    pos_emb = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    neg_emb = torch.tensor([[0.0, 0.0]])
    loss = sampled_softmax(q, pos_ids, pos_emb, torch.tensor([9]), neg_emb, in_batch=True)
    # row 0: pos 1, shared neg 0, in-batch item 2 scores 1; row 1: pos 1, neg 0, item 1 scores 0
    row0 = -(1 - math.log(math.exp(1) + 1 + math.exp(1)))
    row1 = -(1 - math.log(math.exp(1) + 1 + math.exp(0)))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_popularity_sampler_follows_counts():
    counts = torch.tensor([0, 1000, 100, 10, 0])
    s = NegativeSampler(4, "popularity", counts)
    ids = s.sample(100_000, torch.Generator().manual_seed(0))
    assert ids.min() >= 1 and ids.max() <= 4
    freq = torch.bincount(ids, minlength=5)[1:].double() / ids.numel()
    expected = (counts[1:].double() + 1) / (counts[1:].double() + 1).sum()
    assert torch.allclose(freq, expected, atol=0.01)
    assert torch.allclose(s.log_q(torch.tensor([1, 4])).exp().double(), expected[[0, 3]], rtol=1e-5)


def test_uniform_sampler_range_and_logq():
    s = NegativeSampler(10, "uniform")
    ids = s.sample(5000, torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == set(range(1, 11))
    assert s.log_q(ids[:3]).allclose(torch.full((3,), -math.log(10)))


def test_sampler_without_counts_holds_no_catalogue_sized_table():
    # uniform counts give the same log P as no counts at all, but no (N+1,) array per worker
    s = NegativeSampler(10, "uniform")
    assert s.popularity is None and s._cdf is None
    smoothed = NegativeSampler(10, "uniform", torch.zeros(11, dtype=torch.long))
    ids = torch.tensor([0, 1, 7, 10])
    assert torch.equal(s.log_popularity(ids), smoothed.log_popularity(ids))
    assert s.log_popularity(ids)[0] == -math.inf
    # the popularity sampler without counts still draws uniformly, from a CDF
    u = NegativeSampler(10, "popularity")
    assert u._cdf is not None and u.log_q(ids[1:]).allclose(torch.full((3,), -math.log(10)))


@pytest.mark.parametrize("overrides, needs", [
    ({}, False),
    ({"sampler": "popularity"}, True),
    ({"in_batch_negatives": True}, True),
    ({"in_batch_negatives": True, "logq_correction": False}, False),
    ({"type": "full_softmax"}, False),
    ({"type": "bce", "sampler": "popularity"}, True),
])
def test_workers_load_item_counts_only_when_the_loss_reads_them(overrides, needs):
    assert LossConfig(**overrides).needs_counts is needs


def test_loss_positions_all_vs_last():
    hidden = torch.arange(2 * 3 * 1, dtype=torch.float).view(2, 3, 1)
    targets = torch.tensor([[0, 5, 6], [7, 0, 8]])
    # the loss rows are fixed by the batch's shape (no host sync); rows without a target carry id 0
    ids = sample_loss_ids(LossConfig(), targets, NegativeSampler(10), "all")
    assert ids.pos_ids[ids.valid].tolist() == [5, 6, 7, 8] and hidden[ids.mask].squeeze(-1).tolist() == [1, 2, 3, 5]
    assert ids.pos_ids.tolist() == [0, 5, 6, 7, 0, 8] and int(ids.events) == 4
    assert ids.queries(hidden)[ids.valid].squeeze(-1).tolist() == [1, 2, 3, 5]
    ids = sample_loss_ids(LossConfig(), targets, NegativeSampler(10), "last")
    assert ids.pos_ids[ids.valid].tolist() == [6, 8] and hidden[ids.mask].squeeze(-1).tolist() == [2, 5]
    assert ids.queries(hidden).squeeze(-1).tolist() == [2, 5]


@pytest.mark.parametrize("kind", ["sampled_softmax", "bce", "bpr"])
@pytest.mark.parametrize("in_batch", [False, True])
def test_padded_rows_change_nothing(kind, in_batch):
    """The loss over all B*L rows with padding weighing 0 equals the loss over the target rows alone."""
    if in_batch and kind != "sampled_softmax":
        return
    torch.manual_seed(0)
    counts = torch.cat([torch.zeros(1), torch.rand(10) * 50])
    sampler = NegativeSampler(10, "popularity", counts)
    cfg = LossConfig(type=kind, num_negatives=4, sampler="popularity", in_batch_negatives=in_batch)
    emb = torch.nn.Embedding(11, 4)
    hidden = torch.randn(2, 5, 4)
    targets = torch.tensor([[0, 0, 3, 4, 5], [0, 7, 8, 7, 9]])
    padded = next_item_loss(cfg, hidden, targets, emb, sampler, generator=torch.Generator().manual_seed(1))
    keep = targets.reshape(-1) != 0
    q, pos = hidden.reshape(-1, 4)[keep], targets.reshape(-1)[keep]
    if kind == "sampled_softmax":
        neg = sampler.sample(4, torch.Generator().manual_seed(1))
        logp = sampler.log_popularity(pos) if in_batch else None
        alone = sampled_softmax(q, pos, emb(pos), neg, emb(neg), neg_logq=sampler.log_q(neg), pos_logp=logp,
                                in_batch=in_batch)
    else:  # one negative per row, drawn for all 10 rows: the target rows' ones
        neg = sampler.sample(10, torch.Generator().manual_seed(1))[keep]
        alone = (bce if kind == "bce" else bpr)(q, emb(pos), emb(neg))
    assert padded.item() == pytest.approx(alone.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["sampled_softmax", "bce", "bpr"])
def test_next_item_loss_runs_and_backprops(kind):
    emb = torch.nn.Embedding(11, 4)
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    cfg = LossConfig(type=kind, num_negatives=6, in_batch_negatives=kind == "sampled_softmax")
    loss = next_item_loss(cfg, hidden, targets, emb, NegativeSampler(10), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and hidden.grad.abs().sum() > 0 and emb.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["sampled_softmax", "bce"])
def test_empty_batch_still_looks_up_once(kind):
    # a sharded lookup is a collective: a rank with no targets must still join it exactly once
    calls = []
    emb = torch.nn.Embedding(11, 4)

    def embed(ids):
        calls.append(ids.numel())
        return emb(ids)

    hidden = torch.randn(1, 5, 4, requires_grad=True)
    no_targets = torch.zeros(1, 5, dtype=torch.long)
    loss = next_item_loss(LossConfig(type=kind, num_negatives=3), hidden, no_targets, embed, NegativeSampler(10))
    loss.backward()
    assert len(calls) == 1 and loss.item() == 0.0 and hidden.grad is not None


def _loss_of(cfg: LossConfig, hidden: torch.Tensor, targets: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    from model.losses import loss_from_embeddings

    sampler = NegativeSampler(table.shape[0] - 1)
    ids = sample_loss_ids(cfg, targets, sampler, "all", torch.Generator().manual_seed(0))
    return loss_from_embeddings(cfg, hidden, ids, table[ids.all], sampler)


@pytest.mark.parametrize("normalize", [False, True])
def test_full_softmax_is_cross_entropy_over_the_whole_catalogue(normalize):
    torch.manual_seed(0)
    table = torch.randn(41, 6)  # 40 items and the padding row
    table[0] = 0
    hidden = torch.randn(2, 3, 6)  # (B, L, D)
    targets = torch.tensor([[0, 5, 7], [3, 3, 40]])  # one padded position
    cfg = LossConfig(type="full_softmax", temperature=0.5, normalize=normalize)
    got = _loss_of(cfg, hidden, targets, table)
    q, items = hidden.reshape(-1, 6), table[1:]
    if normalize:
        q, items = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(items, dim=-1)
    keep = targets.reshape(-1) != 0
    want = torch.nn.functional.cross_entropy((q @ items.T / 0.5)[keep], targets.reshape(-1)[keep] - 1)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_normalized_loss_ignores_the_scale_of_users_and_items():
    torch.manual_seed(1)
    table = torch.randn(31, 4)
    table[0] = 0
    hidden, targets = torch.randn(2, 5, 4), torch.randint(1, 31, (2, 5))
    cfg = LossConfig(num_negatives=16, normalize=True, temperature=0.1)
    base = _loss_of(cfg, hidden, targets, table)
    assert _loss_of(cfg, hidden * 7.0, targets, table * 0.01).item() == pytest.approx(base.item(), rel=1e-5)
    assert _loss_of(LossConfig(num_negatives=16), hidden * 7.0, targets, table).item() != pytest.approx(
        _loss_of(LossConfig(num_negatives=16), hidden, targets, table).item(), rel=1e-3)


def test_items_are_ranked_by_the_vectors_the_loss_scored():
    from model.losses import item_vectors

    rows = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.1, 0.0]])  # padding, a long row, a short one
    assert torch.equal(item_vectors(LossConfig(), rows), rows)
    unit = item_vectors(LossConfig(normalize=True), rows)
    assert unit[0].tolist() == [0.0, 0.0] and unit[1].tolist() == pytest.approx([0.6, 0.8])
    # a query along the short row ranks it first only in the normalised geometry
    q = torch.tensor([1.0, 0.0])
    assert (rows @ q).argmax().item() == 1 and (unit @ q).argmax().item() == 2


def test_full_softmax_equals_sampled_softmax_with_every_item_as_a_negative():
    # the cross-entropy form and the masked sampled form are the same loss, value and gradients
    torch.manual_seed(1)
    q = torch.randn(9, 5, requires_grad=True)
    items = torch.randn(12, 5, requires_grad=True)  # items 1..12
    pos = torch.tensor([3, 0, 12, 1, 1, 7, 0, 12, 5])
    valid = pos != 0
    every = torch.arange(1, 13)
    got = full_softmax(q, pos, items, temperature=0.3, valid=valid)
    g_got = torch.autograd.grad(got, (q, items))
    want = sampled_softmax(q, pos, items[(pos - 1).clamp(min=0)], every, items, temperature=0.3, valid=valid)
    g_want = torch.autograd.grad(want, (q, items))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-6)
