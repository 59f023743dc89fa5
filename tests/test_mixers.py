"""The FFT mixer against the direct depth-wise convolution, and causality of every mixer."""

import pytest
import torch

from model import mixers
from model.config import ModelConfig
from model.convformer import SequenceEncoder
from model.mixers import CausalSelfAttention, _fast_fft_size, depthwise_conv, fft_conv

# (L, K, D, B): short to long, K from 1 to L, odd sizes on purpose.
GRID = [
    (1, 1, 4, 2),
    (2, 2, 3, 1),
    (7, 3, 5, 3),
    (13, 13, 8, 2),
    (50, 30, 16, 4),
    (50, 50, 8, 9),
    (64, 1, 8, 2),
    (97, 45, 6, 2),
    (200, 200, 8, 2),
    (511, 128, 4, 2),
    (1031, 1031, 4, 2),
    (1031, 517, 3, 1),
]


def _inputs(length, k, dim, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, dim, generator=g)
    # left padding of varied length, zeroed as the encoder does
    pad = torch.randint(0, length, (batch,), generator=g)
    valid = torch.arange(length)[None, :] >= pad[:, None]
    x = x * valid[..., None]
    w = torch.randn(dim, k, generator=g) / k**0.5
    b = torch.randn(dim, generator=g)
    return x, w, b


def _close(a, b, rel=2e-5):
    scale = b.abs().max().clamp(min=1.0)
    assert (a - b).abs().max() <= rel * scale, f"max abs diff {(a - b).abs().max():.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("length,k,dim,batch", GRID)
@pytest.mark.parametrize("padding", ["zero", "circular"])
def test_fft_matches_direct_forward_and_grads(length, k, dim, batch, padding):
    x, w, b = _inputs(length, k, dim, batch)
    results = []
    for op in (depthwise_conv, fft_conv):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        y = op(xi, wi, bi, padding)
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        (y * upstream).sum().backward()
        results.append((y.detach(), xi.grad, wi.grad, bi.grad))
    for direct, fast in zip(*results):
        _close(fast, direct)


@pytest.mark.parametrize("rows", [2, 3, 10, 1000])  # channel blocks (uneven), whole batch rows, one chunk
@pytest.mark.parametrize("padding", ["zero", "circular"])
def test_fft_blocks_match_direct_forward_and_grads(monkeypatch, rows, padding):
    """The blocked transforms: any (batch, channel) blocking, uneven last blocks included."""
    length, k, dim, batch = 97, 45, 5, 3
    n = _fast_fft_size(length + k - 1) if padding == "zero" else length
    monkeypatch.setattr(mixers, "SPECTRUM_CHUNK_BYTES", rows * 8 * (n // 2 + 1))
    monkeypatch.setattr(mixers, "CHUNK_MIN_SEQUENCES", 1)
    blocks = mixers._chunks(batch, dim, n // 2 + 1)
    assert len(blocks) == {2: 9, 3: 6, 10: 2, 1000: 1}[rows]
    x, w, b = _inputs(length, k, dim, batch)
    results = []
    for op in (depthwise_conv, fft_conv):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        y = op(xi, wi, bi, padding)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        results.append((y.detach(), xi.grad, wi.grad, bi.grad))
    for direct, fast in zip(*results):
        _close(fast, direct)


@pytest.mark.parametrize("frozen", ["weight", "bias", "input"])
def test_fft_gradients_with_a_frozen_argument(frozen):
    """Each of x, the filter and the bias may not need a gradient: the forward keeps X only for the filter's."""
    x, w, b = _inputs(97, 45, 5, 3)
    results = []
    for op in (depthwise_conv, fft_conv):
        args = [t.clone().requires_grad_(name != frozen) for name, t in zip(("input", "weight", "bias"), (x, w, b))]
        y = op(*args, "zero")
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        results.append([y.detach()] + [a.grad for a in args])
    for direct, fast in zip(*results):
        if direct is None:
            assert fast is None
        else:
            _close(fast, direct)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_fft_under_activation_checkpointing(use_reentrant):
    """The kept spectra go through save_for_backward, so a checkpointed layer recomputes them (non-reentrant
    frees them after the forward; reentrant runs the first forward without grad and keeps nothing)."""
    x, w, b = _inputs(200, 200, 6, 2)
    grads = []
    for checkpointed in (False, True):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        if checkpointed:
            y = torch.utils.checkpoint.checkpoint(fft_conv, xi, wi, bi, "zero", use_reentrant=use_reentrant)
        else:
            y = fft_conv(xi, wi, bi, "zero")
        y.square().sum().backward()
        grads.append((xi.grad, wi.grad, bi.grad))
    for plain, ckpt in zip(*grads):
        _close(ckpt, plain)


def test_circular_differs_from_zero_padding():
    # guards against both paths silently computing the same (wrong) thing
    x, w, b = _inputs(20, 8, 4, 2)
    assert not torch.allclose(fft_conv(x, w, b, "circular"), fft_conv(x, w, b, "zero"))


def test_zero_padding_equals_explicit_sum():
    # y[t] = b + sum_j w[K-1-j] x[t-j]: the definition, written out
    x, w, b = _inputs(9, 4, 2, 1)
    x = torch.randn_like(x)
    y = torch.zeros_like(x) + b
    for t in range(9):
        for j in range(4):
            if t - j >= 0:
                y[:, t] += w[:, 3 - j] * x[:, t - j]
    _close(fft_conv(x, w, b, "zero"), y)
    _close(depthwise_conv(x, w, b, "zero"), y)


def test_fast_fft_size():
    assert [_fast_fft_size(n) for n in (1, 2, 7, 11, 17, 1000, 1025, 2061)] == [1, 2, 8, 12, 18, 1000, 1080, 2160]


def test_half_precision_fft_runs_in_fp32():
    x, w, b = _inputs(64, 64, 8, 2)
    y16 = fft_conv(x.bfloat16(), w.bfloat16(), b.bfloat16(), "zero")
    assert y16.dtype == torch.bfloat16
    _close(y16.float(), fft_conv(x, w, b, "zero"), rel=2e-2)


CAUSAL = [
    dict(mixer="dwc", padding="zero", kernel_size=5),
    dict(mixer="dwc", padding="zero", kernel_size=32),
    dict(mixer="fft", padding="zero", kernel_size=32),
    dict(mixer="fft", padding="zero", kernel_size=7),
    dict(mixer="attention"),
    dict(mixer="fft", padding="zero", kernel_size=32, block="pre_norm"),
    dict(mixer="dwc", padding="zero", kernel_size=5, block="pre_norm"),
    dict(mixer="attention", block="pre_norm"),
]


def _id(kw: dict) -> str:
    return f"{kw['mixer']}-{kw.get('padding', '')}-K{kw.get('kernel_size', '')}-{kw.get('block', 'post_norm')}"


def _encoder(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, num_layers=2, max_seq_len=32, num_heads=2, dropout=0.0, conv_init_std=0.2, **kw)
    enc = SequenceEncoder(cfg).eval()
    with torch.no_grad():  # LayerNorm biases as training leaves them, not zero: LayerNorm(padding) != 0
        for m in enc.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.bias.normal_(0.0, 0.5)
    return enc


@pytest.mark.parametrize("kw", CAUSAL, ids=_id)
@pytest.mark.parametrize("t", [0, 9, 30])
def test_causal(kw, t):
    enc = _encoder(**kw)
    x = torch.randn(3, 32, 16)
    valid = torch.ones(3, 32, dtype=torch.bool)
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :]) * 5
    y, y2 = enc(x, valid), enc(changed, valid)
    assert torch.equal(y[:, : t + 1], y2[:, : t + 1]) or torch.allclose(y[:, : t + 1], y2[:, : t + 1], atol=1e-5)
    if t < 31:  # the test can fail: later outputs do change
        assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :], atol=1e-3)


@pytest.mark.parametrize("kw", [dict(mixer="dwc", padding="circular", kernel_size=8),
                                dict(mixer="fft", padding="circular", kernel_size=8)])
def test_circular_is_not_causal(kw):
    enc = _encoder(**kw)
    x = torch.randn(2, 32, 16)
    valid = torch.ones(2, 32, dtype=torch.bool)
    changed = x.clone()
    changed[:, -1] += 3.0 * torch.randn(2, 16)  # not a constant shift, which LayerNorm would erase
    assert not torch.allclose(enc(x, valid)[:, 0], enc(changed, valid)[:, 0], atol=1e-4)


@pytest.mark.parametrize(
    "kw",
    CAUSAL + [dict(mixer="dwc", padding="circular", kernel_size=8),
              dict(mixer="dwc", padding="reflect", kernel_size=8)],
    ids=_id,
)
def test_padding_never_influences_real_positions(kw):
    enc = _encoder(**kw)
    pad = 12
    x = torch.randn(2, 32, 16)
    valid = torch.arange(32)[None, :].expand(2, 32) >= pad
    garbage = x.clone()
    garbage[:, :pad] = torch.randn(2, pad, 16) * 100  # whatever sits in padded slots
    y, y2 = enc(x, valid), enc(garbage, valid)
    assert torch.allclose(y[:, pad:], y2[:, pad:], atol=1e-5)
    assert torch.all(y[:, :pad] == 0) and torch.all(y2[:, :pad] == 0)


@pytest.mark.parametrize("block", ["post_norm", "pre_norm"])
@pytest.mark.parametrize("mixer", ["fft", "dwc", "attention"])
def test_left_padding_amount_does_not_matter(mixer, block):
    # The same history in a window of 10 and of 32 gives the same outputs (positions count from the end).
    enc = _encoder(mixer=mixer, kernel_size=32 if mixer == "fft" else 9, padding="zero", block=block)
    hist = torch.randn(1, 10, 16)
    short = enc(hist, torch.ones(1, 10, dtype=torch.bool))
    long_x = torch.cat([torch.zeros(1, 22, 16), hist], dim=1)
    long_valid = torch.arange(32)[None, :] >= 22
    assert torch.allclose(enc(long_x, long_valid)[:, 22:], short, atol=1e-5)


def _masked_attention(attn: CausalSelfAttention, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """The attention baseline as it was before #14: an explicit (B, 1, L, L) mask, which rules out the fused
    kernels on GPU (causal, padded keys hidden, a padded query keeps its own key)."""
    b, length, dim = x.shape
    q, k, v = attn.qkv(x).view(b, length, 3, attn.num_heads, dim // attn.num_heads).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (key_valid[:, None, None, :] | torch.eye(length, dtype=torch.bool))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return attn.out(y.transpose(1, 2).reshape(b, length, dim))


@pytest.mark.parametrize("length", [1, 7, 32])
def test_attention_on_the_causal_kernel_equals_the_masked_one(length):
    """Rotating each left-padded row so that pads trail, then `is_causal` alone: the masked result, exactly up
    to rounding, on every real position, for every amount of padding (none and all included)."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2, dropout=0.0).eval()
    b = 6
    pads = torch.tensor([0, 1, length // 2, length - 1, length, 0]).clamp(max=length)
    valid = torch.arange(length)[None, :] >= pads[:, None]  # (B, L) left padded
    x = torch.randn(b, length, 16) * valid[..., None]  # the encoder zeroes padded inputs
    with torch.no_grad():
        y, ref = attn(x, valid), _masked_attention(attn, x, valid)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[valid], ref[valid], rtol=1e-5, atol=1e-6)
