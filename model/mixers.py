"""Token mixers: how information moves along the sequence axis.

All mixers map (B, L, D) -> (B, L, D). Inputs at padded positions must already be zero
(the encoder guarantees it), so left padding behaves exactly like zero history.

- DepthwiseConv (`dwc`): the paper's LighTCN filter, one K-tap filter per channel, computed
  directly by `conv1d(groups=D)`. O(B D L K).
- FFTConv (`fft`, ConvFormer-F): the same operator by the convolution theorem. O(B D L log L)
  whatever K, so K can equal L.
- CausalSelfAttention (`attention`): the SASRec baseline through scaled_dot_product_attention, on the
  fused causal kernel for left-padded batches (no explicit mask).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: str) -> torch.Tensor:
    """Reference depth-wise convolution, padded on the left by K-1.

    x: (B, L, D); weight: (D, K), tap K-1 multiplies the current position; bias: (D,).
    padding: zero (causal), circular (wraps the end of the sequence onto its start) or reflect.
    """
    _, length, dim = x.shape
    k = weight.shape[1]
    x_bdl = x.transpose(1, 2)  # (B, D, L)
    if k > 1:
        if padding == "zero":
            x_bdl = F.pad(x_bdl, (k - 1, 0))
        elif padding == "circular":
            # wrap more than once when K-1 > L: index modulo L
            idx = torch.arange(-(k - 1), length, device=x.device) % length
            x_bdl = x_bdl[:, :, idx]
        elif padding == "reflect":
            if k - 1 >= length:
                raise ValueError(f"reflect padding needs kernel_size <= sequence length, got K={k}, L={length}")
            x_bdl = F.pad(x_bdl, (k - 1, 0), mode="reflect")
        else:
            raise ValueError(f"unknown padding {padding!r}")
    y_bdl = F.conv1d(x_bdl, weight.unsqueeze(1), bias, groups=dim)  # (B, D, L)
    return y_bdl.transpose(1, 2)


def _fast_fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: pocketfft and cuFFT are fastest on these."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


SPECTRUM_CHUNK_BYTES = 4 << 20  # one chunk's spectrum: small enough to stay in cache between the transforms
CHUNK_MIN_SEQUENCES = 256  # but enough sequences per call for the FFT library's threads (measured on CPU)


def _chunks(batch: int, dim: int, freqs: int) -> list[tuple[slice, slice]]:
    """(batch, channel) blocks of about max(SPECTRUM_CHUNK_BYTES of spectra, CHUNK_MIN_SEQUENCES sequences):
    whole batch rows when one row's channels fit, else blocks of channels of one row."""
    rows = max(1, CHUNK_MIN_SEQUENCES, SPECTRUM_CHUNK_BYTES // (8 * freqs))  # sequences per block
    if rows >= dim:
        step = rows // dim
        return [(slice(b, min(b + step, batch)), slice(0, dim)) for b in range(0, batch, step)]
    size = -(-dim // -(-dim // rows))  # channels per block, as even as the block count allows
    return [(slice(b, b + 1), slice(d, min(d + size, dim))) for b in range(batch) for d in range(0, dim, size)]


def _padded(shape: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
    """A zero (b, d, n) buffer: each block's input is copied into [..., :L] and the tail stays zero, so rfft
    transforms it at length n without the pad-and-copy that `rfft(x, n=n)` makes per call."""
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


class _SpectralConv(torch.autograd.Function):
    """Per-channel convolution of x (B, L, D) with h (D, K) at FFT length n, cut to L outputs, plus a bias.

    Blocked: each (batch, channel) block is transformed, multiplied and transformed back while its spectrum is
    still in cache; memory stays O(B L D) (the padded input and product are one block's). The bias is added in
    the spectrum (n * bias on the zero-frequency bin adds bias to every output), and its gradient is the
    zero-frequency bin of the upstream gradient's spectrum, so neither costs a pass over (B, L, D). The backward
    is hand-written: the adjoint of a convolution is a correlation, so grad_x = irfft(G conj(H)) and
    grad_h = irfft(sum_b G conj(X)). When h needs a gradient the forward keeps each block's X (about twice
    x's bytes at zero padding, once at circular) rather than x, so the backward makes two transforms per block,
    not three.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, n: int) -> torch.Tensor:
        batch, length, dim = x.shape
        keep = ctx.needs_input_grad[1]  # X is read only by grad_h
        h_f = torch.fft.rfft(h, n=n)  # (D, F), F = n//2 + 1
        dc = n * bias  # (D,) on the zero-frequency bin of the product: bias on every output
        y = torch.empty_like(x)  # (B, L, D)
        blocks = _chunks(batch, dim, h_f.shape[-1])
        buf = _padded((blocks[0][0].stop - blocks[0][0].start, blocks[0][1].stop, n), x)
        spectra = []
        product = torch.empty(buf.shape[:2] + h_f.shape[-1:], dtype=h_f.dtype, device=x.device) if keep else None
        for b, d in blocks:
            xb = buf[: b.stop - b.start, : d.stop - d.start]  # (b, d, n)
            xb[..., :length].copy_(x[b, :, d].transpose(1, 2))
            x_f = torch.fft.rfft(xb)  # (b, d, F)
            if keep:
                spectra.append(x_f)
                y_f = torch.mul(x_f, h_f[d], out=product[: xb.shape[0], : xb.shape[1]])
            else:
                y_f = x_f.mul_(h_f[d])
            y_f[..., 0] += dc[d]
            y[b, :, d] = torch.fft.irfft(y_f, n=n)[..., :length].transpose(1, 2)
        ctx.save_for_backward(h_f, *spectra)
        ctx.n, ctx.k, ctx.shape = n, h.shape[1], x.shape
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        h_f, *spectra = ctx.saved_tensors
        n = ctx.n
        batch, length, dim = ctx.shape
        want_x, want_h, want_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(grad_y) if want_x else None
        acc = torch.zeros_like(h_f) if want_h else None  # (D, F): sum over the batch of G conj(X)
        grad_b = torch.zeros(dim, dtype=grad_y.dtype, device=grad_y.device) if want_b else None
        h_conj = h_f.conj().resolve_conj()
        blocks = _chunks(batch, dim, h_f.shape[-1])
        gbuf = _padded((blocks[0][0].stop - blocks[0][0].start, blocks[0][1].stop, n), grad_y)
        for i, (b, d) in enumerate(blocks):
            rows, chans = b.stop - b.start, d.stop - d.start
            gb = gbuf[:rows, :chans]
            gb[..., :length].copy_(grad_y[b, :, d].transpose(1, 2))
            g_f = torch.fft.rfft(gb)  # (b, d, F)
            if want_b:
                grad_b[d] += g_f[..., 0].real.sum(0)
            if want_h:
                if g_f.shape[-1] <= 256:  # one reduction over the rows; long rows go faster one at a time
                    acc[d] += torch.linalg.vecdot(spectra[i], g_f, dim=0)  # sum_b conj(X) G
                else:
                    for g_row, x_row in zip(g_f, spectra[i]):
                        acc[d].addcmul_(g_row, x_row.conj())
            if want_x:
                grad_x[b, :, d] = torch.fft.irfft(g_f.mul_(h_conj[d]), n=n)[..., :length].transpose(1, 2)
        grad_h = torch.fft.irfft(acc, n=n)[..., : ctx.k] if want_h else None
        return grad_x, grad_h, grad_b, None


def fft_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: str) -> torch.Tensor:
    """The depth-wise convolution of `depthwise_conv`, computed with rfft/irfft.

    zero: exact linear (causal) convolution, transforming at a fast size >= L + K - 1, so the
    circular wrap-around only ever lands on zero padding.
    circular: the paper's ConvFormer-F, transforming at exactly L (a circular convolution).
    """
    _, length, dim = x.shape
    k = weight.shape[1]
    # conv1d is a cross-correlation; as a convolution the filter is reversed: h[j] = w[K-1-j],
    # so h[0] multiplies the current position and h[j] the input j steps back.
    h = weight.flip(-1)  # (D, K)
    if padding == "zero":
        h = h[:, :length]  # taps reaching back past the window only ever see zeros
        n = _fast_fft_size(length + h.shape[1] - 1)
    elif padding == "circular":
        if k > length:  # fold the filter onto the circle of length L
            h = F.pad(h, (0, (-k) % length)).reshape(dim, -1, length).sum(1)
        n = length
    else:
        raise ValueError(f"fft_conv supports padding 'zero' or 'circular', got {padding!r}")
    orig_dtype = x.dtype
    if x.dtype in (torch.float16, torch.bfloat16):
        x, h = x.float(), h.float()  # FFTs in half precision lose too much; compute in fp32
    if bias is None:
        bias = torch.zeros(dim, dtype=x.dtype, device=x.device)
    y = _SpectralConv.apply(x, h, bias.to(x.dtype), n)  # (B, L, D), the bias included
    return y.to(orig_dtype)


class DepthwiseConv(nn.Module):
    def __init__(self, dim: int, kernel_size: int, padding: str, init_std: float, use_fft: bool) -> None:
        super().__init__()
        self.padding = padding
        self.use_fft = use_fft
        self.weight = nn.Parameter(torch.randn(dim, kernel_size) * init_std)  # (D, K)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        op = fft_conv if self.use_fft else depthwise_conv
        return op(x, self.weight, self.bias, self.padding)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), LEFT padded: key_valid (B, L) is False on a prefix of each row and True after it.

        Each row is rotated left by its padding, so its real events come first and its pads last; plain causal
        attention (`is_causal`, no mask: the fused flash / memory-efficient kernels on GPU) then keeps every
        real query on real keys only, since all pads come after all real events. The output is rotated back.
        Real positions get the masked result up to rounding (the same keys, in the same order); padded ones get
        values that the block zeroes. No host sync: the rotation is a gather by device-side indices. Padding
        anywhere but on the left is not supported (it is not checked: that would be a host sync).
        """
        b, length, dim = x.shape
        pad = length - key_valid.sum(1, keepdim=True)  # (B, 1) padded positions per row
        pos = torch.arange(length, device=x.device)[None, :]  # (1, L)
        rotate = ((pos + pad) % length).unsqueeze(-1).expand(b, length, dim)  # rotated j <- original j + pad
        unrotate = ((pos - pad) % length).unsqueeze(-1).expand(b, length, dim)
        x = x.gather(1, rotate)
        q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, dim // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)  # (B, H, L, Dh)
        y = self.out(y.transpose(1, 2).reshape(b, length, dim))
        return y.gather(1, unrotate)


def build_mixer(cfg: ModelConfig) -> nn.Module:
    if cfg.mixer == "attention":
        return CausalSelfAttention(cfg.dim, cfg.num_heads, cfg.dropout)
    return DepthwiseConv(cfg.dim, cfg.kernel_size, cfg.padding, cfg.conv_init_std, use_fft=cfg.mixer == "fft")
