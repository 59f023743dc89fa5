"""The self-contained model directory: what a single process needs to serve a trained model.

    MODEL_DIR/config.json        format, the model config, item count, raw-id type, where it came from (written last)
    MODEL_DIR/items/part-R.parquet   row int64 (1..N), raw_id (the log's id; absent for dense ids), count int64
                                 (training-window events: the empty-history fallback), embedding list<float32>[D]
    MODEL_DIR/dense.pt           the dense tower's state dict (model.SequenceEncoder), fp32, for torch.load
    MODEL_DIR/vocab/             a copy of the run's vocabulary directory (data/vocab.py), when it had one
    MODEL_DIR/user_tower.onnx    the user tower in ONNX (onnx_export.py), when exported

`load` needs torch, pyarrow and numpy only (tests check that it imports no Ray, TorchRec or DeepSpeed). Row 0
is padding: never in items/, a zero row in `ServingModel.items`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model.config import ModelConfig
from model.convformer import SequenceEncoder, last_hidden
from trainer.serving.errors import ModelDirError

FORMAT = "convformer-model/1"
CONFIG, ITEMS, DENSE, VOCAB, ONNX = "config.json", "items", "dense.pt", "vocab", "user_tower.onnx"


@dataclass
class ModelMeta:
    """config.json."""

    model: ModelConfig
    num_items: int
    raw_id_type: Optional[str]  # "string" or "int64": raw ids went through a vocabulary; None: rows are the ids
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint or run, step, precision, zero stage
    eval: dict[str, Any] = field(default_factory=dict)  # the run's eval.ks, eval.exclude_seen, eval.batch_size
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_items(out: Path, part: int, rows: np.ndarray, embeddings: np.ndarray, counts: np.ndarray,
                raw_ids: Optional[pa.Array]) -> None:
    """One part of items/: rows (n,) >= 1, embeddings (n, D) fp32, counts (n,), raw ids (n,) or None."""
    dim = embeddings.shape[1]
    flat = pa.array(np.ascontiguousarray(embeddings, np.float32).reshape(-1))
    columns: dict[str, Any] = {"row": pa.array(np.asarray(rows, np.int64))}
    if raw_ids is not None:
        columns["raw_id"] = raw_ids
    columns["count"] = pa.array(np.asarray(counts, np.int64))
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim)
    (out / ITEMS).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), out / ITEMS / f"part-{part:05d}.parquet")


def write_dense(out: Path, state: dict[str, torch.Tensor]) -> None:
    """The tower's weights as fp32 CPU tensors (a bf16 run's weights widen exactly)."""
    torch.save({k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}, out / DENSE)


def write_meta(out: Path, meta: ModelMeta, vocab_dir: Optional[str]) -> None:
    """The vocabulary copy, then config.json: written last, so a directory without it is incomplete."""
    if vocab_dir:
        shutil.copytree(vocab_dir, out / VOCAB, dirs_exist_ok=True)
    tmp = out / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(meta.to_dict(), indent=1) + "\n")
    os.replace(tmp, out / CONFIG)


def raw_id_type(raw_ids: Optional[pa.Array]) -> Optional[str]:
    if raw_ids is None:
        return None
    return "int64" if pa.types.is_integer(raw_ids.type) else "string"


# ---------------------------------------------------------------- loading


@dataclass
class ServingModel:
    meta: ModelMeta
    encoder: SequenceEncoder  # eval mode, fp32
    items: torch.Tensor  # (N + 1, D) fp32, row 0 zero (padding)
    counts: np.ndarray  # (N + 1,) int64 training-window events per row
    raw_ids: Optional[pa.Array]  # (N,) raw ids of rows 1..N; None: rows are the ids
    path: Path
    _index: Optional[dict[Any, int]] = field(default=None, repr=False)  # raw id -> row, built on first use

    @property
    def num_items(self) -> int:
        return self.meta.num_items

    @torch.no_grad()
    def user_vectors(self, histories: torch.Tensor) -> torch.Tensor:
        """Left-padded histories of rows (B, L<=max_seq_len), 0 = padding -> (B, D) fp32 user vectors."""
        valid = histories != 0
        hidden = self.encoder(self.items[histories], valid)  # (B, L, D)
        return last_hidden(hidden, valid)

    def rows_of(self, raw: Sequence[str]) -> tuple[list[int], list[str]]:
        """Raw id tokens (as typed on a command line) -> (their rows in order, the tokens that are unknown)."""
        rows = [self._row(t) for t in raw]
        unknown = [t for t, r in zip(raw, rows) if r is None]
        return [r for r in rows if r is not None], unknown

    def _row(self, token: str) -> Optional[int]:
        if self.raw_ids is None:  # dense ids: the id is the row
            r = _int_or_none(token)
            return r if r is not None and 1 <= r <= self.num_items else None
        if self._index is None:  # built once (about 0.3 s per 10^6 ids), then a dict lookup per token
            self._index = dict(zip(self.raw_ids.to_pylist(), range(1, self.num_items + 1)))
        return self._index.get(_int_or_none(token) if self.meta.raw_id_type == "int64" else token)

    def raw_of(self, rows: Sequence[int]) -> list[Any]:
        """Rows (>= 1) -> raw ids (the rows themselves for dense ids)."""
        if self.raw_ids is None:
            return [int(r) for r in rows]
        return self.raw_ids.take(pa.array(np.asarray(rows, np.int64) - 1)).to_pylist()


def _int_or_none(token: str) -> Optional[int]:
    try:
        return int(token)
    except ValueError:
        return None


def load(path: str | os.PathLike) -> ServingModel:
    """Read a model directory; raises ModelDirError naming what is missing or wrong."""
    root = Path(path)
    if not root.is_dir():
        raise ModelDirError(f"{root}: no such model directory")
    cfg_path = root / CONFIG
    if not cfg_path.is_file():
        raise ModelDirError(f"{root}: not a complete model directory ({CONFIG} is missing)")
    try:
        raw = json.loads(cfg_path.read_text())
        if raw.get("format") != FORMAT:
            raise ModelDirError(f"{cfg_path}: format {raw.get('format')!r}, expected {FORMAT!r}")
        meta = ModelMeta(**{**raw, "model": ModelConfig(**raw["model"])})
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise ModelDirError(f"{cfg_path}: not a model config ({type(e).__name__}: {e})") from None
    n, dim = meta.num_items, meta.model.dim
    try:
        table = pq.read_table(root / ITEMS).sort_by("row")
        state = torch.load(root / DENSE, map_location="cpu", weights_only=True)
    except (OSError, pa.ArrowInvalid, RuntimeError) as e:
        raise ModelDirError(f"{root}: cannot read the model's files ({e})") from None
    rows = table.column("row").to_numpy()
    if not np.array_equal(rows, np.arange(1, n + 1)):
        raise ModelDirError(f"{root / ITEMS}: expected rows 1..{n} once each, found {len(rows)} rows")
    emb = table.column("embedding").combine_chunks()
    items = torch.zeros(n + 1, dim)
    items[1:] = torch.from_numpy(emb.values.to_numpy().reshape(n, dim).copy())
    counts = np.concatenate([[0], table.column("count").to_numpy()]).astype(np.int64)
    raw_ids = table.column("raw_id").combine_chunks() if "raw_id" in table.column_names else None
    encoder = SequenceEncoder(meta.model)
    encoder.load_state_dict(state)
    return ServingModel(meta, encoder.eval(), items, counts, raw_ids, root)
