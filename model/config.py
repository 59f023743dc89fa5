"""Model and loss configuration. Plain dataclasses, validated on construction."""

from dataclasses import dataclass
from typing import Literal

Mixer = Literal["dwc", "fft", "attention"]
Padding = Literal["zero", "circular", "reflect"]


@dataclass
class ModelConfig:
    # real items have ids 1..num_items; id 0 is padding. 0: the trainer takes it from the data
    num_items: int = 0
    dim: int = 64
    num_layers: int = 2
    max_seq_len: int = 50  # L: the window the encoder sees
    mixer: Mixer = "fft"
    kernel_size: int = 50  # K: taps per channel for dwc/fft
    # zero: causal (left zero padding). circular/reflect: the paper's non-causal variants.
    padding: Padding = "zero"
    # post_norm: the paper's block, LayerNorm after each residual. pre_norm: LayerNorm before each sub-layer
    # and once at the end, which stays stable when deep (more than a few blocks)
    block: Literal["post_norm", "pre_norm"] = "post_norm"
    num_heads: int = 2  # attention only
    ffn_mult: int = 4
    dropout: float = 0.2
    conv_init_std: float = 0.005  # the paper's filter init
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.num_items < 0:
            raise ValueError(f"model.num_items must be >= 1, or 0 to take it from the data; got {self.num_items}")
        for name in ("dim", "num_layers", "max_seq_len", "kernel_size", "num_heads", "ffn_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.mixer in ("dwc", "fft") and self.kernel_size > self.max_seq_len:
            raise ValueError(
                f"model.kernel_size={self.kernel_size} exceeds model.max_seq_len={self.max_seq_len}; "
                "taps beyond the window never see an input"
            )
        if self.mixer == "fft" and self.padding == "reflect":
            raise ValueError("model.padding='reflect' has no FFT form; use mixer 'dwc' or padding 'zero'/'circular'")
        if self.mixer == "attention" and self.dim % self.num_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.num_heads={self.num_heads}")

    @property
    def causal(self) -> bool:
        """Whether output t depends only on inputs <= t."""
        return self.mixer == "attention" or self.padding == "zero"


@dataclass
class LossConfig:
    # sampled_softmax: shared negatives (+ optional in-batch); full_softmax: the positive against every item of
    # the catalogue (exact; a step looks up the whole table, so for catalogues of thousands, not millions);
    # bce: the paper's, one negative; bpr: pairwise.
    type: Literal["sampled_softmax", "full_softmax", "bce", "bpr"] = "sampled_softmax"
    num_negatives: int = 256  # shared per batch for sampled_softmax; bce/bpr draw one per position
    sampler: Literal["uniform", "popularity"] = "uniform"
    in_batch_negatives: bool = False
    logq_correction: bool = True  # subtract log Q(item) from sampled logits
    temperature: float = 1.0  # logits are divided by it
    # L2-normalised user and item vectors: logits are cosines / temperature, and items are ranked (evaluation,
    # export, serving) by their normalised vectors, the geometry they were trained in
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.num_negatives < 1:
            raise ValueError(f"training.loss.num_negatives must be >= 1, got {self.num_negatives}")
        if self.temperature <= 0:
            raise ValueError(f"training.loss.temperature must be > 0, got {self.temperature}")
        if self.type != "sampled_softmax" and self.in_batch_negatives:
            raise ValueError(f"training.loss.in_batch_negatives needs type 'sampled_softmax', not '{self.type}'")

    @property
    def needs_counts(self) -> bool:
        """Whether the loss reads the training-window item counts: the popularity sampler, or log Q of
        in-batch negatives (drawn as the data draws them). Otherwise workers never load the (N+1,) counts."""
        in_batch_logq = self.type == "sampled_softmax" and self.in_batch_negatives and self.logq_correction
        return self.sampler == "popularity" or in_batch_logq
