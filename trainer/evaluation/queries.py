"""Evaluation query rows (data/split.py's QUERY_SCHEMA) -> padded tensors."""

from typing import Optional

import numpy as np
import pyarrow as pa
import torch


def pad_lists(column: pa.ChunkedArray | pa.Array, width: Optional[int] = None, left: bool = False) -> torch.Tensor:
    """A list<int64> column -> (B, width) int64, padded with 0 (right by default, left for histories);
    lists longer than `width` keep their last `width` items."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    off = arr.offsets.to_numpy()  # (B + 1,)
    values = arr.values.to_numpy(zero_copy_only=False)
    lengths = np.diff(off)
    width = int(lengths.max(initial=0)) if width is None else width
    n = np.minimum(lengths, width)  # (B,)
    out = np.zeros((len(lengths), max(width, 1)), np.int64)
    col = np.arange(out.shape[1])[None, :]
    take = col < n[:, None]  # (B, W): the first n slots hold items (before shifting for left padding)
    src = (off[1:] - n)[:, None] + col  # the last n items of each list
    out[take] = values[src[take]]
    if left:
        shift = out.shape[1] - n  # roll each row right by its padding
        idx = (col - shift[:, None]) % out.shape[1]
        out = np.where(col >= shift[:, None], np.take_along_axis(out, idx, 1), 0)
    return torch.from_numpy(out)


def query_tensors(rows: pa.Table, seq_len: int) -> dict[str, torch.Tensor]:
    return {
        "history": pad_lists(rows.column("history"), seq_len, left=True),  # (B, L)
        "targets": torch.from_numpy(rows.column("target").to_numpy().astype(np.int64)),  # (B,)
        "seen": pad_lists(rows.column("seen_items")),  # (B, S)
        "relevant": pad_lists(rows.column("day_items")),  # (B, R)
    }
