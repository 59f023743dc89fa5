"""From the `data:` config to files the trainer reads: one call.

    prepared = prepare(cfg.data, work_dir="runs/x/data", query_len=cfg.model.max_seq_len)
    loader = make_loader(prepared.train_dir, seq_len=..., batch_size=..., seed=...)

Steps: the log (`data.path`, or the synthetic log of `data.synth` generated under work_dir and reused when
its config is unchanged) -> sequences through the evaluation day -> training window + evaluation queries.
"""

import datetime as dt
import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Optional

from data.config import DataConfig
from data.schema import PathLike
from data.schema import LogError
from data.sequences import build_sequences
from data.split import leave_one_out, prepare_held_out
from data.stats import num_items
from data.synth import META, generate


@dataclass
class Prepared:
    log_dir: str
    seq_dir: str  # sequences through the eval day (what the oracle can reuse)
    train_dir: str  # training sequences (the loader's source)
    eval_dir: str  # evaluation queries (leave-one-out: the test queries)
    eval_day: Optional[dt.date]  # None for leave-one-out
    num_items: int  # largest item id: model.num_items must be at least this
    num_train_users: int
    num_queries: int
    synthetic: bool
    valid_dir: Optional[str] = None  # leave-one-out validation queries
    num_valid_queries: int = 0


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


def prepare(cfg: DataConfig, work_dir: PathLike, query_len: int, eval_day: Optional[str] = None) -> Prepared:
    """Build (or rebuild) sequences and the split (cfg.split) under work_dir."""
    synthetic = not cfg.path
    log_dir = synthetic_log(cfg, work_dir) if synthetic else cfg.path
    if cfg.split == "leave_one_out":
        return _prepare_leave_one_out(cfg, log_dir, work_dir, query_len, synthetic)
    split = prepare_held_out(
        log_dir,
        work_dir,
        query_len,
        eval_day=eval_day or cfg.eval_day,
        train_days=cfg.train_days,
        min_history=cfg.min_history,
        backend=cfg.backend,
        max_bad_fraction=cfg.max_bad_fraction,
        rows_per_bucket=cfg.rows_per_bucket,
        overwrite=True,
    )
    return Prepared(
        log_dir=log_dir,
        seq_dir=os.path.join(os.fspath(work_dir), "sequences"),
        train_dir=split.train_dir,
        eval_dir=split.eval_dirs["eval"],
        eval_day=split.eval_day,
        num_items=num_items(log_dir),
        num_train_users=split.num_train_users,
        num_queries=split.num_queries["eval"],
        synthetic=synthetic,
    )


def _prepare_leave_one_out(cfg: DataConfig, log_dir: str, work_dir: PathLike, query_len: int,
                           synthetic: bool) -> Prepared:
    seq_dir = os.path.join(os.fspath(work_dir), "sequences")
    build_sequences(log_dir, seq_dir, backend=cfg.backend, max_bad_fraction=cfg.max_bad_fraction,
                    rows_per_bucket=cfg.rows_per_bucket, overwrite=True)
    split = leave_one_out(seq_dir, os.path.join(os.fspath(work_dir), "loo"), query_len, backend=cfg.backend,
                          overwrite=True)
    if split.num_queries["test"] == 0:
        raise LogError(log_dir, "leave-one-out needs users with at least 3 events; the log has none")
    return Prepared(
        log_dir=log_dir, seq_dir=seq_dir, train_dir=split.train_dir, eval_dir=split.eval_dirs["test"],
        eval_day=None, num_items=num_items(log_dir), num_train_users=split.num_train_users,
        num_queries=split.num_queries["test"], synthetic=synthetic, valid_dir=split.eval_dirs["valid"],
        num_valid_queries=split.num_queries["valid"],
    )
