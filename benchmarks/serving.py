"""Serving on CPU from a model directory: the ONNX user tower against torch, FAISS exact and IVF search,
and `trainer.recommend` end to end (raw ids in, raw ids out), for a random model of `--items` items.

    python -m benchmarks.serving --out benchmarks/results/serving-cpu.json     # 10^6 items, D=64 (minutes)
    python -m benchmarks.serving --small --out /tmp/serving-small.json         # 10^4 items, a few seconds

Reported: `onnx_max_abs_err` (ONNX vs torch, random histories of every length 1..L), `onnx_vs_torch_latency`
(ms per call at batch 1 and 64, length L, and torch over ONNX), `faiss_exact_qps` and `faiss_approx_qps`
(queries/s, top-10, a batch of user vectors), `faiss_approx_recall_at_10` (IVF against exact), and
`recommend_qps` (one history per call: raw-id mapping, the torch tower, exact search, seen items removed,
raw ids back).
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from benchmarks.results import provenance, write_result
from model.config import ModelConfig
from model.convformer import SequenceEncoder
from trainer.recommend import Recommender
from trainer.serving import model_dir as md
from trainer.serving.index import build_index, recall_at_k, search
from trainer.serving.onnx_export import export_onnx, onnx_session, run_onnx


def write_random_model(out: Path, items: int, dim: int, seq: int) -> md.ServingModel:
    cfg = ModelConfig(num_items=items, dim=dim, num_layers=2, max_seq_len=seq, mixer="fft", kernel_size=seq,
                      dropout=0.0)
    torch.manual_seed(0)
    rows = np.arange(1, items + 1)
    table = torch.randn(items, dim) * 0.1
    counts = np.random.default_rng(0).zipf(1.3, items).clip(max=10**9)
    md.write_items(out, 0, rows, table.numpy(), counts, pa.array([f"sku-{r}" for r in rows]))
    md.write_dense(out, SequenceEncoder(cfg).state_dict())
    md.write_meta(out, md.ModelMeta(model=cfg, num_items=items, raw_id_type="string"), None)
    return md.load(out)


def histories(n: int, length: int, items: int, gen: torch.Generator) -> torch.Tensor:
    """(n, length) rows, left padded by 0..length-1."""
    hist = torch.randint(1, items + 1, (n, length), generator=gen)
    pads = torch.randint(0, length, (n,), generator=gen)
    hist[torch.arange(length)[None, :] < pads[:, None]] = 0
    return hist


def per_call_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seq", type=int, default=50, help="model.max_seq_len (L)")
    p.add_argument("--queries", type=int, default=4096, help="user vectors per FAISS search run")
    p.add_argument("--recommend-calls", type=int, default=200)
    p.add_argument("--small", action="store_true", help="10^4 items, fewer queries: a quick check")
    p.add_argument("--out", default="benchmarks/results/serving-cpu.json")
    a = p.parse_args()
    if a.small:
        a.items, a.queries, a.recommend_calls = 10_000, 256, 50
    load = os.getloadavg()
    gen = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        model = write_random_model(Path(tmp), a.items, a.dim, a.seq)
        session = onnx_session(export_onnx(model))

        # ONNX parity at every length, then latency at full length
        err = 0.0
        for length in range(1, a.seq + 1):
            hist = histories(16, length, a.items, gen)
            err = max(err, float(np.abs(run_onnx(session, hist.numpy()) - model.user_vectors(hist).numpy()).max()))
        latency = {}
        for batch in (1, 64):
            hist = histories(batch, a.seq, a.items, gen)
            repeats = 200 if batch == 1 else 20
            t_torch = per_call_ms(lambda: model.user_vectors(hist), repeats)
            t_onnx = per_call_ms(lambda: run_onnx(session, hist.numpy()), repeats)
            latency[f"batch_{batch}"] = {"torch_ms": round(t_torch, 3), "onnx_ms": round(t_onnx, 3),
                                         "torch_over_onnx": round(t_torch / t_onnx, 2)}

        # FAISS on user vectors of random histories
        users = np.concatenate([model.user_vectors(h).numpy()
                                for h in histories(a.queries, a.seq, a.items, gen).split(512)])
        items = model.items[1:].numpy()
        exact = build_index(items, "exact")
        t0 = time.perf_counter()
        _, exact_rows = search(exact, users, 10)
        exact_qps = a.queries / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        ivf = build_index(items, "ivf")
        ivf_build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, ivf_rows = search(ivf, users, 10)
        ivf_qps = a.queries / (time.perf_counter() - t0)

        # recommend, one history per call, raw ids in and out
        rec = Recommender(model, exact)
        raw = [model.raw_of(h[h != 0].tolist()) for h in histories(a.recommend_calls, a.seq, a.items, gen)]
        rec.recommend(raw[0], 10)
        t0 = time.perf_counter()
        for h in raw:
            rec.recommend(h, 10)
        recommend_qps = a.recommend_calls / (time.perf_counter() - t0)

    result = {
        "benchmark": "serving from a model directory: ONNX user tower vs torch, FAISS exact / IVF, recommend",
        "items": a.items, "dim": a.dim, "max_seq_len": a.seq, "mixer": "fft (ONNX: its direct convolution)",
        "num_layers": 2, "queries": a.queries, "torch_threads": torch.get_num_threads(),
        "onnx_max_abs_err": err,
        "onnx_vs_torch_latency": latency,
        "faiss_exact_qps": round(exact_qps, 1),
        "faiss_approx_qps": round(ivf_qps, 1),
        "faiss_approx_recall_at_10": round(recall_at_k(ivf_rows, exact_rows, 10), 4),
        "faiss_approx_index": {"type": "IVFFlat, inner product", "nlist": ivf.nlist, "nprobe": ivf.nprobe,
                               "build_s": round(ivf_build_s, 2)},
        "recommend_qps": round(recommend_qps, 1),
        **provenance(load),
    }
    write_result(result, a.out)


if __name__ == "__main__":
    main()
