"""The user tower in ONNX: left-padded histories of item rows (B, L) int64 -> user vectors (B, D) fp32, with
dynamic batch and length axes (1 <= L <= model.max_seq_len), run by onnxruntime.

Two departures from the torch modules, both equal in value (tests/test_serving.py checks parity at every L):
- the `fft` mixer is exported as its direct depth-wise convolution (`model.mixers.depthwise_conv`, the
  reference it is tested against): the FFT path is a custom autograd.Function over torch.fft, which the
  exporter does not carry, and at these window lengths the direct form is cheap;
- positions are `pos_emb.weight[:L].flip(0)` instead of `pos_emb(arange(L - 1, -1, -1))`: the exported Range
  with a negative step and a dynamic start came out empty for every L but the traced one (onnxruntime
  1.32, both torch exporters).
The TorchScript exporter (`dynamo=False`) is used: 1 s per export here against 8 s for the dynamo exporter,
the same graph parity, and no onnxscript dependency.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.convformer import last_hidden
from model.mixers import DepthwiseConv
from trainer.serving.model_dir import ONNX, ServingModel

OPSET = 17


class UserTower(nn.Module):
    """Item rows (B, L) -> (B, D): table lookup, the dense tower, the output at the last real position."""

    def __init__(self, model: ServingModel) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(model.encoder).eval()
        for m in self.encoder.modules():
            if isinstance(m, DepthwiseConv):
                m.use_fft = False  # the direct convolution: the same operator, exportable
        self.register_buffer("items", model.items.clone())  # (N + 1, D)

    def forward(self, histories: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        valid = histories != 0  # (B, L)
        length = histories.shape[1]
        positions = enc.pos_emb.weight[:length].flip(0)  # (L, D): the newest event is position 0
        keep = valid.unsqueeze(-1).to(torch.float32)  # (B, L, 1)
        x = enc.emb_norm(self.items[histories] + positions) * keep  # dropout is the identity in eval
        return last_hidden(enc.run_blocks(x, valid), valid)  # (B, D)


def export_onnx(model: ServingModel, out: str | os.PathLike | None = None) -> Path:
    """Write the user tower to `out` (default MODEL_DIR/user_tower.onnx); returns the path."""
    path = Path(out) if out is not None else model.path / ONNX
    tower = UserTower(model).eval()
    length = model.meta.model.max_seq_len  # reflect padding needs L > K - 1 at export
    example = torch.ones(2, length, dtype=torch.long)
    # the exporter warns about strided slices (the flip), advanced indexing with negative indices (ours are
    # >= 0) and branches on the filter's fixed width; the parity test is the check that matters
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # `if k > 1` on a weight's fixed shape
        torch.onnx.export(tower, (example,), str(path), input_names=["histories"], output_names=["users"],
                          dynamic_axes={"histories": {0: "batch", 1: "length"}, "users": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    return path


def onnx_session(path: str | os.PathLike, threads: int = 0):
    """An onnxruntime CPU session (threads 0: onnxruntime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # warnings about buffer reuse at new lengths are noise
    # onnxruntime's threads spin between runs by default: on a few cores they starve torch and FAISS in the
    # same process (a recommend call: 4.6 ms after an onnxruntime run instead of 2.2 ms, on 2 cores)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session, histories: np.ndarray) -> np.ndarray:
    """(B, L) int64 rows -> (B, D) fp32."""
    return session.run(["users"], {"histories": np.ascontiguousarray(histories, np.int64)})[0]
