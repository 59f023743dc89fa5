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


class _SpectralConv(torch.autograd.Function):
    """Per-channel convolution of x (B, L, D) with h (D, K) at FFT length n, cut to L outputs.

    A hand-written backward: the adjoint of a convolution is a correlation, so both gradients
    reuse the saved spectra and the backward needs two large transforms (autograd through
    rfft/irfft needs more, and more memory). Transforms run over the channel-major view.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, n: int) -> torch.Tensor:
        length, k = x.shape[1], h.shape[1]
        x_f = torch.fft.rfft(x.transpose(1, 2), n=n)  # (B, D, n//2+1)
        h_f = torch.fft.rfft(h, n=n)  # (D, n//2+1)
        ctx.save_for_backward(x_f, h_f)
        ctx.n, ctx.length, ctx.k = n, length, k
        return torch.fft.irfft(x_f * h_f, n=n)[..., :length].transpose(1, 2)  # (B, L, D)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_f, h_f = ctx.saved_tensors
        g_f = torch.fft.rfft(grad_y.transpose(1, 2), n=ctx.n)  # (B, D, n//2+1)
        grad_x = grad_h = None
        if ctx.needs_input_grad[1]:
            # sum over the batch without materialising the (B, D, F) product
            grad_h = torch.fft.irfft(torch.einsum("bdf,bdf->df", g_f, x_f.conj()), n=ctx.n)[..., : ctx.k]
        if ctx.needs_input_grad[0]:
            grad_x = torch.fft.irfft(g_f.mul_(h_f.conj()), n=ctx.n)[..., : ctx.length].transpose(1, 2)
        return grad_x, grad_h, None


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
    y = _SpectralConv.apply(x, h, n)  # (B, L, D)
    if bias is not None:
        y = y + bias
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
