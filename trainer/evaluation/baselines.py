"""Baselines reported beside the model: the most popular items of the training window, and on synthetic
held-out-day logs the generator's Bayes-optimal oracle. Both run on the driver, in one process."""

import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data.oracle import oracle_metrics
from data.prepare import PreparedData
from data.sequences import sequence_files
from trainer.config import Config
from trainer.evaluation.queries import query_tensors
from trainer.evaluation.ranking import EvalBatch, PopularityScorer, evaluate


def popularity_metrics(counts: np.ndarray, query_batches: Iterable[pa.Table], ks: Sequence[int],
                       exclude_seen: bool, seq_len: int) -> dict[str, float]:
    """The most-popular-items ranking, through the same ranking and metric code as the model."""
    scorer = PopularityScorer(torch.from_numpy(counts), 0, len(counts))

    def batches() -> Iterator[EvalBatch]:
        for rows in query_batches:
            q = query_tensors(rows, seq_len)
            yield EvalBatch(torch.zeros(len(q["targets"]), 1), q["targets"], q["seen"], q["relevant"])

    return evaluate(scorer, batches(), ks, dim=1, exclude_seen=exclude_seen)


def baselines(cfg: Config, data: PreparedData) -> dict[str, Any]:
    """The baselines the config asks for, by name: popularity (eval.popularity_baseline), oracle (eval.oracle)."""
    out: dict[str, Any] = {}
    if cfg.eval.popularity_baseline:
        batches = (pq.read_table(p) for p in sequence_files(data.eval_queries))
        out["popularity"] = popularity_metrics(data.load_item_counts(cfg.model.num_items), batches, cfg.eval.ks,
                                               cfg.eval.exclude_seen, cfg.model.max_seq_len)
    if cfg.eval.oracle and data.synthetic and data.eval_day is not None:
        # the oracle needs sequences in the generator's ids: the prepared ones, unless a vocabulary renumbered them
        out["oracle"] = oracle_metrics(data.log_dir, data.eval_day, cfg.eval.ks, min_history=cfg.data.min_history,
                                       backend=cfg.data.backend, seq_dir=None if data.vocab else data.sequences,
                                       work_dir=os.path.dirname(data.sequences))
    return out
