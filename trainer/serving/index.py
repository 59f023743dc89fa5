"""The item embeddings in FAISS: exact inner product (IndexFlatIP) and one approximate index (IVF-Flat,
inner product), with the approximate index's recall@k against the exact one.

Rows 1..N of the table go in, at FAISS ids 0..N-1; results come back as rows (id + 1). Inner product is
the model's own score (dot products with the item table), so neither index normalises.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np

IndexKind = Literal["exact", "ivf"]


def build_index(items: np.ndarray, kind: IndexKind = "exact", nlist: Optional[int] = None,
                nprobe: Optional[int] = None, seed: int = 0):
    """items: (N, D) fp32, rows 1..N. ivf: `nlist` cells (default about 4 sqrt(N)), k-means trained on at
    most 64 points per cell, `nprobe` cells visited per query (default nlist / 16: about 1/16 of the items
    scanned)."""
    import faiss

    items = np.ascontiguousarray(items, np.float32)
    n, dim = items.shape
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))  # FAISS wants >= 39 points per cell
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.max_points_per_centroid = 64
        index.train(items)
        index.nprobe = min(nprobe or max(1, nlist // 16), nlist)
    else:
        raise ValueError(f"unknown index kind {kind!r}; use 'exact' or 'ivf'")
    index.add(items)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) -> scores (Q, k), rows (Q, k) best first; row 0 marks an empty slot."""
    scores, ids = index.search(np.ascontiguousarray(queries, np.float32), k)
    return scores, ids + 1  # FAISS's -1 (no result) becomes row 0


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k & exact top-k| / k."""
    a, e = approx_rows[:, :k], exact_rows[:, :k]
    hits = (a[:, :, None] == e[:, None, :]).any(2).sum(1)
    return float(hits.mean() / k)
