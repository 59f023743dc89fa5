"""From the `data:` config to the files the trainer reads: one call, one object.

    data = prepare(cfg.data, work_dir="runs/x/data", query_len=cfg.model.max_seq_len)
    loader = make_loader(data.train_sequences, seq_len=..., batch_size=..., seed=...)

Steps: the log (`data.path`, or the synthetic log of `data.synth` generated under work_dir and reused when
its config is unchanged) -> the vocabulary when its ids are raw (data/vocab.py) -> sequences through the
evaluation day -> training window + evaluation queries (held-out day), or training + validation + test
queries (leave-one-out) -> training-window item counts.
`PreparedData` is what the workers receive (as a dict): plain paths and numbers, the same names everywhere.
"""

import dataclasses
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.config import DataConfig
from data.ray_utils import EventsFn
from data.schema import LogError, PathLike, SkipReport, list_days
from data.sequences import build_sequences, sequence_files
from data.split import leave_one_out, prepare_held_out, resolve_eval_day
from data.stats import item_counts, num_items, sequence_item_counts, window_days
from data.synth import META, generate
from data.vocab import Vocabulary, build_vocabulary, id_types, needs_vocabulary

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
    num_items: int  # items of the data: the vocabulary's size, or a dense log's largest id
    num_train_users: int
    num_eval_queries: int
    num_valid_queries: int
    synthetic: bool
    skipped: dict[str, Any] = field(default_factory=dict)  # rows skipped while counting (SkipReport.to_dict)
    vocab: Optional[str] = None  # the vocabulary's directory (data/vocab.py); None: dense ids as they are
    vocab_summary: Optional[dict[str, Any]] = None
    vocab_sha256: Optional[str] = None  # of the mapping: a checkpoint is resumed on the same vocabulary only
    oov_eval_targets: int = 0  # evaluation (test) targets outside the vocabulary: each one a miss

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_item_counts(self, num_items: int) -> np.ndarray:
        return load_item_counts(self.item_counts, num_items)


def load_item_counts(path: PathLike, num_items: int) -> np.ndarray:
    """(num_items + 1,) int64 from an item-counts file: the counts, zero for ids the data never had."""
    counts = np.load(path)
    if len(counts) > num_items + 1:
        raise ValueError(f"{path} counts {len(counts) - 1} items, more than num_items={num_items}")
    if len(counts) == num_items + 1:
        return counts
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


def prepare(cfg: DataConfig, work_dir: PathLike, query_len: int, eval_day: Optional[str] = None,
            on_events: Optional[EventsFn] = None) -> PreparedData:
    """Build (or rebuild) the vocabulary when the ids need one, sequences, the split (cfg.split) and the item
    counts under work_dir. `on_events`: the sequence build's progress, (events read, events in the log)."""
    work_dir = os.fspath(work_dir)
    synthetic = not cfg.path
    log_dir = synthetic_log(cfg, work_dir) if synthetic else cfg.path
    seq_dir = os.path.join(work_dir, "sequences")
    loo = cfg.split == "leave_one_out"
    day = None if loo else resolve_eval_day(log_dir, eval_day or cfg.eval_day)
    window = None if day is None else window_days(day, cfg.train_days, list_days(log_dir))
    unit = cfg.ts_unit  # how every reader below takes an integer `ts` column
    vocab = vocab_dir = ids = None
    types = id_types(log_dir, ts_unit=unit)  # one pass over the footers, for both decisions
    if needs_vocabulary(log_dir, cfg.vocab, types, ts_unit=unit):
        vocab = build_vocabulary(log_dir, window, cfg.vocab, max_bad_fraction=cfg.max_bad_fraction,
                                 backend=cfg.backend, user_type=types[0], ts_unit=unit)
        vocab_dir = vocab.save(os.path.join(work_dir, "vocab"))
        ids = vocab.id_map()
    items = vocab.num_items if vocab is not None else num_items(log_dir, ts_unit=unit)
    oov = ids.oov if ids is not None else 0
    skipped = SkipReport()
    if loo:
        build_sequences(log_dir, seq_dir, backend=cfg.backend, max_bad_fraction=cfg.max_bad_fraction,
                        rows_per_bucket=cfg.rows_per_bucket, overwrite=True, ids=ids, on_events=on_events,
                        ts_unit=unit)
        split = leave_one_out(seq_dir, os.path.join(work_dir, "loo"), query_len, backend=cfg.backend, overwrite=True,
                              oov=oov)
        if split.num_queries["test"] == 0:
            raise LogError(log_dir, "leave-one-out needs users with at least 3 events; the log has none")
        counts = sequence_item_counts(split.train_sequences, items)  # no held-out target is counted
        test, valid = split.queries["test"], split.queries["valid"]
    else:
        split = prepare_held_out(
            log_dir, work_dir, query_len, eval_day=day, train_days=cfg.train_days, min_history=cfg.min_history,
            backend=cfg.backend, max_bad_fraction=cfg.max_bad_fraction, rows_per_bucket=cfg.rows_per_bucket,
            overwrite=True, ids=ids, on_events=on_events, ts_unit=unit,
        )
        counts = vocab.counts() if vocab is not None else item_counts(
            log_dir, window, items, max_bad_fraction=cfg.max_bad_fraction, report=skipped, ts_unit=unit)
        test, valid = split.queries["eval"], None
    counts_path = os.path.join(work_dir, COUNTS_FILE)
    np.save(counts_path, counts)
    return PreparedData(
        log_dir=os.fspath(log_dir), sequences=seq_dir, train_sequences=split.train_sequences, eval_queries=test,
        valid_queries=valid, eval_day=day.isoformat() if day is not None else None,
        item_counts=counts_path, num_items=items, num_train_users=split.num_train_users,
        num_eval_queries=split.num_queries["test" if loo else "eval"],
        num_valid_queries=split.num_queries.get("valid", 0), synthetic=synthetic, skipped=skipped.to_dict(),
        vocab=vocab_dir, vocab_summary=vocab.summary() if vocab is not None else None,
        vocab_sha256=Vocabulary.digest(vocab_dir) if vocab_dir else None,
        oov_eval_targets=count_target(test, oov) if oov else 0,
    )


def count_target(queries: str, item: int) -> int:
    """Queries of a directory whose target is `item`."""
    return sum(int(pc.sum(pc.equal(pq.read_table(p, columns=["target"]).column("target"), item)).as_py() or 0)
               for p in sequence_files(queries))
