"""The one-call data preparation the trainer uses, on a small synthetic log."""

import os

from data.config import DataConfig, SynthConfig
from data.loader import make_loader
from data.prepare import prepare
from data.split import read_queries
from data.synth import oracle_metrics


def test_prepare_synthetic_then_reuse_and_oracle(tmp_path):
    cfg = DataConfig(synth=SynthConfig(users=300, items=120, days=3, workers=1), backend="arrow", train_days=1)
    p = prepare(cfg, tmp_path, query_len=10)
    assert p.synthetic and p.eval_day.isoformat() == "2026-01-03" and p.num_items == 120
    q = read_queries(p.eval_dir)
    assert q.num_rows == p.num_queries > 0 and max(len(h) for h in q.column("history").to_pylist()) == 10
    batches = list(make_loader(p.train_dir, seq_len=10, batch_size=32, seed=0))
    assert batches and batches[0]["input_ids"].shape == (32, 10)
    stamp = os.path.getmtime(os.path.join(p.log_dir, "_synth.json"))
    again = prepare(cfg, tmp_path, query_len=10)  # same synth config: the log is reused, the split rebuilt
    assert os.path.getmtime(os.path.join(again.log_dir, "_synth.json")) == stamp
    oracle = oracle_metrics(p.log_dir, ks=(10,), seq_dir=p.seq_dir)
    assert oracle["queries"] == p.num_queries and 0 < oracle["hr@10"] <= 1
