"""The one-call data preparation the trainer uses, on a small synthetic log."""

import os

import numpy as np

from data.config import DataConfig, SynthConfig
from data.loader import make_loader
from data.oracle import oracle_metrics
from data.prepare import PreparedData, prepare
from data.split import read_queries
from data.stats import num_items


def test_prepare_synthetic_then_reuse_and_oracle(tmp_path):
    cfg = DataConfig(synth=SynthConfig(users=300, items=120, days=3, workers=1), backend="arrow", train_days=1)
    p = prepare(cfg, tmp_path, query_len=10)
    assert p.synthetic and p.eval_day == "2026-01-03" and num_items(p.log_dir) == p.num_items == 120
    assert p.vocab is None and p.oov_eval_targets == 0  # dense ids: no vocabulary
    assert PreparedData(**p.to_dict()) == p  # what the workers receive, as a dict
    q = read_queries(p.eval_queries)
    assert q.num_rows == p.num_eval_queries > 0 and max(len(h) for h in q.column("history").to_pylist()) == 10
    assert p.valid_queries is None and p.num_valid_queries == 0
    batches = list(make_loader(p.train_sequences, seq_len=10, batch_size=32, seed=0))
    assert batches and batches[0]["input_ids"].shape == (32, 10)
    counts = p.load_item_counts(200)  # the table may be larger than the data: zero counts beyond
    assert counts.shape == (201,) and counts[0] == 0 and counts.sum() > 0 and not counts[121:].any()
    assert np.array_equal(counts[:121], np.load(p.item_counts))
    stamp = os.path.getmtime(os.path.join(p.log_dir, "_synth.json"))
    again = prepare(cfg, tmp_path, query_len=10)  # same synth config: the log is reused
    assert os.path.getmtime(os.path.join(again.log_dir, "_synth.json")) == stamp
    oracle = oracle_metrics(p.log_dir, ks=(10,), seq_dir=p.sequences)
    assert oracle["queries"] == p.num_eval_queries and 0 < oracle["hr@10"] <= 1
