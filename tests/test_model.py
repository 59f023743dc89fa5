"""The model learns: 120 steps on a tiny next-item task beat a popularity ranking."""

import pytest
import torch

from model.config import LossConfig, ModelConfig
from model.convformer import ConvFormer, last_hidden
from model.losses import NegativeSampler
from tests.helpers import next_item_loss

NUM_ITEMS, L = 60, 20


def _sequences(n: int, seed: int) -> torch.Tensor:
    """Order-dependent sequences: the next item is succ[prev] with prob 0.7, else a Zipf draw."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randperm(NUM_ITEMS, generator=torch.Generator().manual_seed(123)) + 1  # fixed across calls
    zipf = 1.0 / torch.arange(1, NUM_ITEMS + 1).double()
    seqs = torch.zeros(n, L + 1, dtype=torch.long)
    seqs[:, 0] = torch.multinomial(zipf, n, replacement=True, generator=g) + 1
    for t in range(1, L + 1):
        follow = torch.rand(n, generator=g) < 0.7
        noise = torch.multinomial(zipf, n, replacement=True, generator=g) + 1
        seqs[:, t] = torch.where(follow, succ[seqs[:, t - 1] - 1], noise)
    # varied history lengths, left padded
    lengths = torch.randint(3, L + 2, (n,), generator=g)
    keep = torch.arange(L + 1)[None, :] >= (L + 1 - lengths[:, None])
    return seqs * keep


def _hit_rate(scores: torch.Tensor, target: torch.Tensor, k: int) -> float:
    return (scores.topk(k, dim=1).indices == target[:, None]).any(1).float().mean().item()


@pytest.mark.parametrize(
    "mixer,loss,positions,block,layers",
    [("fft", "sampled_softmax", "all", "post_norm", 2), ("dwc", "bce", "last", "post_norm", 2),
     ("attention", "bpr", "all", "post_norm", 2),
     pytest.param("fft", "sampled_softmax", "all", "pre_norm", 8, marks=pytest.mark.slow)],  # 8 deep blocks
)
def test_training_beats_popularity(mixer, loss, positions, block, layers):
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=NUM_ITEMS, dim=32, num_layers=layers, max_seq_len=L, mixer=mixer, kernel_size=L,
                      dropout=0.1, block=block)
    model = ConvFormer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=6e-3)
    train = _sequences(4096, seed=1)
    test = _sequences(1000, seed=2)
    sampler = NegativeSampler(NUM_ITEMS)
    loss_cfg = LossConfig(type=loss, num_negatives=32)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(120):
        batch = train[torch.randint(0, len(train), (64,), generator=g)]
        inputs, targets = batch[:, :-1], batch[:, 1:] * (batch[:, :-1] != 0)  # no target from padding
        hidden = model(inputs)
        value = next_item_loss(loss_cfg, hidden, targets, model.item_emb, sampler, positions, g)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert sum(losses[-30:]) / 30 < 0.8 * sum(losses[:30]) / 30

    model.eval()
    with torch.no_grad():
        inputs, target = test[:, :-1], test[:, -1]
        user = last_hidden(model(inputs), inputs != 0)  # (B, D)
        scores = user @ model.item_emb.weight[1:].T  # (B, I): column j is item j+1
    popularity = torch.bincount(train[:, 1:].flatten(), minlength=NUM_ITEMS + 1)[1:].float()
    hr_model = _hit_rate(scores, target - 1, 10)
    hr_pop = _hit_rate(popularity.expand(len(test), -1), target - 1, 10)
    assert hr_model > hr_pop + 0.2, (hr_model, hr_pop)


def test_last_hidden_picks_last_real_position():
    hidden = torch.arange(2 * 4, dtype=torch.float).view(2, 4, 1)
    valid = torch.tensor([[False, True, True, True], [False, False, True, False]])
    assert last_hidden(hidden, valid).squeeze(-1).tolist() == [3.0, 6.0]
