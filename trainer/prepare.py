"""Driver-side data preparation: the log (generated when none is given), the held-out day split
(training sequences and evaluation queries), item popularity, and the baselines."""

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from data import synth
from data.schema import SkipReport, list_days
from data.sequences import sequence_files
from data.split import prepare_held_out, resolve_eval_day
from data.stats import item_counts, window_days
from trainer.config import Config
from trainer.queries import popularity_metrics


@dataclass
class PreparedData:
    log_dir: str
    eval_day: str
    train_sequences: str  # directory of sequence shards (the training window)
    eval_queries: str  # directory of query shards (data/split.py QUERY_SCHEMA)
    counts_ref: Any = None  # ObjectRef of the (num_items + 1,) training-window counts; reaches any node
    num_train_users: int = 0
    num_eval_queries: int = 0
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
    log_dir = Path(cfg.data.path) if cfg.data.path else ensure_synthetic(cfg, out / "data" / "log")
    phases["synth"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    split = prepare_held_out(
        log_dir, out / "data" / "split", cfg.model.max_seq_len, eval_day=cfg.data.eval_day,
        train_days=cfg.data.train_days, min_history=cfg.data.min_history, backend=cfg.data.backend,
        max_bad_fraction=cfg.data.max_bad_fraction, rows_per_bucket=cfg.data.rows_per_bucket, overwrite=True,
    )
    day = resolve_eval_day(log_dir, cfg.data.eval_day)
    skipped = SkipReport()
    counts = item_counts(log_dir, window_days(day, cfg.data.train_days, list_days(log_dir)), cfg.model.num_items,
                         max_bad_fraction=cfg.data.max_bad_fraction, report=skipped)
    phases["split"] = time.perf_counter() - t0

    data = PreparedData(
        log_dir=str(log_dir), eval_day=day.isoformat(), train_sequences=split.train_dir,
        eval_queries=split.eval_dirs["eval"], counts_ref=ray.put(counts), num_train_users=split.num_train_users,
        num_eval_queries=split.num_queries["eval"], skipped=skipped.to_dict(),
    )
    t0 = time.perf_counter()
    if cfg.eval.popularity_baseline:
        batches = (pq.read_table(p) for p in sequence_files(data.eval_queries))
        data.baselines["popularity"] = popularity_metrics(counts, batches, cfg.eval.ks, cfg.eval.exclude_seen,
                                                          cfg.model.max_seq_len)
    if cfg.eval.oracle and (log_dir / synth.META).is_file():
        data.baselines["oracle"] = synth.oracle_metrics(log_dir, day.isoformat(), cfg.eval.ks,
                                                        min_history=cfg.data.min_history)
    phases["baselines"] = time.perf_counter() - t0
    data.phases_s = phases
    return data


def ensure_synthetic(cfg: Config, log_dir: Path) -> Path:
    """Generate the configured synthetic log, or reuse one generated earlier with the same settings."""
    meta = log_dir / synth.META
    if meta.is_file():
        if json.loads(meta.read_text())["config"] == dataclasses.asdict(cfg.data.synth):
            return log_dir
        raise ValueError(f"{log_dir} holds a synthetic log with other data.synth settings; remove it or change output.dir")
    synth.generate(cfg.data.synth, log_dir)
    return log_dir
