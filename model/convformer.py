"""ConvFormer (arXiv 2308.02925): a Transformer whose attention is a large-kernel depth-wise
convolution (LighTCN), plus the SASRec attention baseline behind the same block.

The dense tower (`SequenceEncoder`) takes item embeddings from outside, so the trainer can look
them up in a sharded TorchRec table; `ConvFormer` adds an nn.Embedding front for single-process
use and tests. Nothing here knows about Ray, TorchRec sharding or DeepSpeed.
"""

import torch
from torch import nn

from model.config import ModelConfig
from model.mixers import build_mixer


class Block(nn.Module):
    """Token mixer then FFN. post_norm (the paper's): each sub-layer is LayerNorm(x + dropout(sublayer(x))).
    pre_norm: x + dropout(sublayer(LayerNorm(x))), the residual stream left unnormalised, which keeps deep
    stacks trainable; the encoder then normalises the output once."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.block == "pre_norm"
        self.mixer = build_mixer(cfg)
        self.mixer_norm = nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_mult * cfg.dim),
            nn.GELU(),
            nn.Linear(cfg.ffn_mult * cfg.dim, cfg.dim),
        )
        self.ffn_norm = nn.LayerNorm(cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        keep = valid.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        if self.pre_norm:
            # LayerNorm of a padded (zero) row is its bias: masked again, so no padding reaches the mixer
            x = x + self.dropout(self.mixer(self.mixer_norm(x) * keep, valid)) * keep
            return x + self.dropout(self.ffn(self.ffn_norm(x))) * keep
        x = self.mixer_norm(x + self.dropout(self.mixer(x, valid))) * keep
        x = self.ffn_norm(x + self.dropout(self.ffn(x))) * keep
        return x  # (B, L, D), zero at padded positions


class SequenceEncoder(nn.Module):
    """The dense tower: position embedding, LayerNorm, dropout, N blocks (and a final LayerNorm after
    pre-norm blocks).

    Position p is counted back from the end of the window (the newest event is position 0), so
    a history gets the same positions however much left padding its batch needs.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.emb_norm = nn.LayerNorm(cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.out_norm = nn.LayerNorm(cfg.dim) if cfg.block == "pre_norm" else None
        self.checkpoint_blocks = False  # set by the trainer for long sequences
        nn.init.normal_(self.pos_emb.weight, std=cfg.init_std)

    def forward(self, item_emb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """item_emb: (B, L, D); valid: (B, L) bool, False at padding. Returns (B, L, D)."""
        length = item_emb.shape[1]
        if length > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        positions = torch.arange(length - 1, -1, -1, device=item_emb.device)  # (L,)
        keep = valid.unsqueeze(-1).to(item_emb.dtype)  # (B, L, 1)
        x = self.dropout(self.emb_norm(item_emb + self.pos_emb(positions))) * keep
        return self.run_blocks(x, valid)

    def run_blocks(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The blocks (and the final norm) over embedded inputs x (B, L, D), zero at padding."""
        for block in self.blocks:
            if self.checkpoint_blocks and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, valid, use_reentrant=False)
            else:
                x = block(x, valid)
        if self.out_norm is not None:
            x = self.out_norm(x) * valid.unsqueeze(-1).to(x.dtype)
        return x


class ConvFormer(nn.Module):
    """Item table + SequenceEncoder, for single-process training and tests."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.dim, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=cfg.init_std)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.encoder = SequenceEncoder(cfg)

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        """item_ids: (B, L) int64, 0 = padding. Returns hidden states (B, L, D)."""
        return self.encoder(self.item_emb(item_ids), item_ids != 0)


def last_hidden(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """User representation: the output at the last real position. (B, L, D) -> (B, D)."""
    length = hidden.shape[1]
    idx = torch.arange(length, device=hidden.device).expand_as(valid)
    last = torch.where(valid, idx, -1).amax(dim=1).clamp(min=0)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
