"""From the `data:` config to the files the trainer reads: one call, one object.

    data = prepare(cfg.data, work_dir="runs/x/data", query_len=cfg.model.max_seq_len, num_items=1000)
    loader = make_loader(data.train_sequences, seq_len=..., batch_size=..., seed=...)

Steps: the log (`data.path`, or the synthetic log of `data.synth` generated under work_dir and reused when
its config is unchanged) -> sequences through the evaluation day -> training window + evaluation queries
(held-out day), or training + validation + test queries (leave-one-out) -> training-window item counts.
`PreparedData` is what the workers receive (as a dict): plain paths and numbers, the same names everywhere.
"""

import dataclasses
import datetime as dt
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from data.config import DataConfig
from data.schema import LogError, PathLike, SkipReport, list_days
from data.sequences import build_sequences
from data.split import leave_one_out, prepare_held_out
from data.stats import item_counts, sequence_item_counts, window_days
from data.synth import META, generate

COUNTS_FILE = "item_counts.npy"


@dataclass
class PreparedData:
    log_dir: str
    sequences: str  # every user's sequence through the evaluation day (what the oracle reuses)
    train_sequences: str  # the training split (the loader's source)
    eval_queries: str  # held-out-day queries; leave-one-out: the test queries (data/split.py QUERY_SCHEMA)
    valid_queries: Optional[str]  # leave-one-out validation queries (model selection); None for held-out day
    eval_day: Optional[str]  # YYYY-MM-DD; None for leave-one-out
    item_counts: str  # .npy of (num_items + 1,) int64 training-window events per item id
    num_train_users: int
    num_eval_queries: int
    num_valid_queries: int
    synthetic: bool
    skipped: dict[str, Any] = field(default_factory=dict)  # rows skipped while counting (SkipReport.to_dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_item_counts(self, num_items: int) -> np.ndarray:
        """(num_items + 1,) int64: the counts, zero for ids the data never had."""
        counts = np.load(self.item_counts)
        if len(counts) > num_items + 1:
            raise ValueError(f"{self.item_counts} counts {len(counts) - 1} items, more than num_items={num_items}")
        return np.pad(counts, (0, num_items + 1 - len(counts)))


def synthetic_log(cfg: DataConfig, work_dir: PathLike) -> str:
    """The log of cfg.synth under work_dir/synth-log, generated unless an identical one is there."""
    log_dir = os.path.join(os.fspath(work_dir), "synth-log")
    meta = os.path.join(log_dir, META)
    if os.path.isfile(meta):
        with open(meta) as f:
            if json.load(f)["config"] == asdict(cfg.synth):
                return log_dir
    shutil.rmtree(log_dir, ignore_errors=True)
    return generate(cfg.synth, log_dir)


def prepare(cfg: DataConfig, work_dir: PathLike, query_len: int, num_items: int,
            eval_day: Optional[str] = None) -> PreparedData:
    """Build (or rebuild) sequences, the split (cfg.split) and the item counts under work_dir.
    `num_items`: the item table's size; a larger id in the log is a LogError."""
    work_dir = os.fspath(work_dir)
    synthetic = not cfg.path
    log_dir = synthetic_log(cfg, work_dir) if synthetic else cfg.path
    seq_dir = os.path.join(work_dir, "sequences")
    skipped = SkipReport()
    if cfg.split == "leave_one_out":
        build_sequences(log_dir, seq_dir, backend=cfg.backend, max_bad_fraction=cfg.max_bad_fraction,
                        rows_per_bucket=cfg.rows_per_bucket, overwrite=True)
        split = leave_one_out(seq_dir, os.path.join(work_dir, "loo"), query_len, backend=cfg.backend, overwrite=True)
        if split.num_queries["test"] == 0:
            raise LogError(log_dir, "leave-one-out needs users with at least 3 events; the log has none")
        counts = sequence_item_counts(split.train_sequences, num_items)  # no held-out target is counted
        day = None
        test, valid = split.queries["test"], split.queries["valid"]
    else:
        split = prepare_held_out(
            log_dir, work_dir, query_len, eval_day=eval_day or cfg.eval_day, train_days=cfg.train_days,
            min_history=cfg.min_history, backend=cfg.backend, max_bad_fraction=cfg.max_bad_fraction,
            rows_per_bucket=cfg.rows_per_bucket, overwrite=True,
        )
        day = split.eval_day
        days = window_days(day, cfg.train_days, list_days(log_dir))
        counts = item_counts(log_dir, days, num_items, max_bad_fraction=cfg.max_bad_fraction, report=skipped)
        test, valid = split.queries["eval"], None
    counts_path = os.path.join(work_dir, COUNTS_FILE)
    np.save(counts_path, counts)
    return PreparedData(
        log_dir=os.fspath(log_dir), sequences=seq_dir, train_sequences=split.train_sequences, eval_queries=test,
        valid_queries=valid, eval_day=day.isoformat() if isinstance(day, dt.date) else None,
        item_counts=counts_path, num_train_users=split.num_train_users,
        num_eval_queries=split.num_queries["test" if valid else "eval"],
        num_valid_queries=split.num_queries.get("valid", 0), synthetic=synthetic, skipped=skipped.to_dict(),
    )
