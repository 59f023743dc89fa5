"""Driver-side data preparation: data.prepare's split (held-out day, or leave-one-out with a validation
split), training item popularity, and the baselines (popularity; the oracle on synthetic held-out-day logs)."""

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.parquet as pq
import ray

from data import synth
from data.prepare import prepare
from data.schema import SkipReport, list_days
from data.sequences import sequence_files
from data.stats import item_counts, sequence_item_counts, window_days
from trainer.config import Config
from trainer.queries import popularity_metrics


@dataclass
class PreparedData:
    log_dir: str
    eval_day: Optional[str]  # None for leave-one-out
    train_sequences: str  # directory of sequence shards (the training window)
    eval_queries: str  # directory of query shards (data/split.py QUERY_SCHEMA); leave-one-out: test
    valid_queries: Optional[str] = None  # leave-one-out validation queries (model selection, early stopping)
    counts_ref: Any = None  # ObjectRef of the (num_items + 1,) training-window counts; reaches any node
    num_train_users: int = 0
    num_eval_queries: int = 0
    num_valid_queries: int = 0
    skipped: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)
    phases_s: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreparedData":
        return cls(**d)

    def item_counts(self) -> np.ndarray:
        return ray.get(self.counts_ref)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in ("counts_ref", "baselines", "phases_s")}


def prepare_data(cfg: Config, out: Path) -> PreparedData:
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    # the synthetic log (when data.path is empty) is generated under out/data and reused if unchanged
    split = prepare(cfg.data, out / "data", cfg.model.max_seq_len)
    if split.num_items > cfg.model.num_items:
        raise ValueError(
            f"model.num_items={cfg.model.num_items} is smaller than the largest item id {split.num_items} "
            f"in {split.log_dir}: the item table must hold every item"
        )
    skipped = SkipReport()
    if split.eval_day is None:  # leave-one-out: popularity of the training split (no held-out targets)
        counts = sequence_item_counts(split.train_dir, cfg.model.num_items)
    else:
        days = window_days(split.eval_day, cfg.data.train_days, list_days(split.log_dir))
        counts = item_counts(split.log_dir, days, cfg.model.num_items, max_bad_fraction=cfg.data.max_bad_fraction,
                             report=skipped)
    phases["data_split"] = time.perf_counter() - t0

    data = PreparedData(
        log_dir=str(split.log_dir), eval_day=split.eval_day.isoformat() if split.eval_day else None,
        train_sequences=split.train_dir, eval_queries=split.eval_dir, valid_queries=split.valid_dir,
        counts_ref=ray.put(counts), num_train_users=split.num_train_users, num_eval_queries=split.num_queries,
        num_valid_queries=split.num_valid_queries, skipped=skipped.to_dict(),
    )
    t0 = time.perf_counter()
    if cfg.eval.popularity_baseline:
        batches = (pq.read_table(p) for p in sequence_files(data.eval_queries))
        data.baselines["popularity"] = popularity_metrics(counts, batches, cfg.eval.ks, cfg.eval.exclude_seen,
                                                          cfg.model.max_seq_len)
    if cfg.eval.oracle and split.synthetic and split.eval_day is not None:
        data.baselines["oracle"] = synth.oracle_metrics(split.log_dir, data.eval_day, cfg.eval.ks,
                                                        min_history=cfg.data.min_history, seq_dir=split.seq_dir)
    phases["baselines"] = time.perf_counter() - t0
    data.phases_s = phases
    return data
