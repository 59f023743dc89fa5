"""Data configuration: where the behaviour log is, how it is generated, split and loaded.

Every field is checked in __post_init__; a bad value is a ValueError naming `data.<field>`
(`data.synth.<field>` for the generator).
"""

import datetime as _dt
from dataclasses import dataclass, field
from typing import Literal, Optional


def _check_int(section: str, name: str, value: object, lo: int, hi: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{section}.{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{section}.{name} must be {bound}, got {value}")


def _check_float(section: str, name: str, value: object, lo: float, hi: float, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{section}.{name} must be a number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        raise ValueError(f"{section}.{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")


def _check_date(section: str, name: str, value: object) -> None:
    try:
        _dt.date.fromisoformat(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{section}.{name} must be a date YYYY-MM-DD, got {value!r}") from None


@dataclass
class SynthConfig:
    """Synthetic log generated when `data.path` is empty (see data/synth.py and docs/data.md)."""

    users: int = 2000
    items: int = 1000
    days: int = 8
    seed: int = 0
    events_per_user: float = 100.0  # mean; per-user counts are log-normal (heavy tailed)
    # log-normal sigma of the events per user: 1.0 gives a heavy tail; 0 gives every user events_per_user
    # (a long-lag regime wants every history longer than lag_max: configs/long-context.yaml)
    events_sigma: float = 1.0
    zipf_s: float = 1.0  # popularity weight of the item with popularity rank r is r**-zipf_s
    p_transition: float = 0.3  # next item is a successor of the previous one
    p_repeat: float = 0.2  # next item repeats the one consumed exactly `lag` events ago
    neighbours: int = 4  # successors per item for the transition component
    lag_min: int = 50  # per-user repeat lag is drawn from [lag_min, lag_max]
    lag_max: int = 400
    new_item_fraction: float = 0.3  # items activated after the first day, evenly over the days
    session_len: float = 10.0  # mean events per session
    start_day: str = "2026-01-01"
    users_per_chunk: int = 20000  # unit of parallel work and of bounded memory
    workers: int = 0  # processes; 0 means one per CPU
    # Ids as written: dense (1..items, users 1..users), hashed (scrambled positive 64-bit integers) or
    # string ("sku-17", "user-3"): the last two go through the vocabulary stage like industrial logs.
    raw_ids: Literal["dense", "hashed", "string"] = "dense"

    def __post_init__(self) -> None:
        s = "data.synth"
        _check_int(s, "users", self.users, 1)
        _check_int(s, "items", self.items, 1, 2**40)
        _check_int(s, "days", self.days, 1, 3650)
        _check_int(s, "seed", self.seed, 0, 2**63 - 1)
        _check_float(s, "events_per_user", self.events_per_user, 2.0, 1e6)
        _check_float(s, "events_sigma", self.events_sigma, 0.0, 3.0)
        _check_float(s, "zipf_s", self.zipf_s, 0.0, 5.0)
        _check_float(s, "p_transition", self.p_transition, 0.0, 1.0)
        _check_float(s, "p_repeat", self.p_repeat, 0.0, 1.0)
        if self.p_transition + self.p_repeat >= 1.0:
            # The popularity component must keep every active item possible, or the oracle's ranks break.
            raise ValueError(
                f"data.synth.p_transition + data.synth.p_repeat must be < 1, got {self.p_transition + self.p_repeat}"
            )
        _check_int(s, "neighbours", self.neighbours, 1, 64)
        _check_int(s, "lag_min", self.lag_min, 1)
        _check_int(s, "lag_max", self.lag_max, 1)
        if self.lag_max < self.lag_min:
            raise ValueError(f"data.synth.lag_max={self.lag_max} is below data.synth.lag_min={self.lag_min}")
        _check_float(s, "new_item_fraction", self.new_item_fraction, 0.0, 0.99)
        _check_float(s, "session_len", self.session_len, 1.0, 1e6)
        _check_date(s, "start_day", self.start_day)
        _check_int(s, "users_per_chunk", self.users_per_chunk, 1)
        _check_int(s, "workers", self.workers, 0, 1024)
        if self.raw_ids not in ("dense", "hashed", "string"):
            raise ValueError(f"data.synth.raw_ids must be 'dense', 'hashed' or 'string', got {self.raw_ids!r}")

    @property
    def p_popularity(self) -> float:
        return 1.0 - self.p_transition - self.p_repeat


@dataclass
class VocabConfig:
    """The vocabulary stage (data/vocab.py): raw item ids -> rows of the item table."""

    build: Literal["auto", "always", "never"] = "auto"  # auto: for string ids or sparse (hashed) integer ids
    min_count: int = 1  # items with fewer training-window events are out of vocabulary
    max_items: int = 0  # keep at most this many, most frequent first; 0: no limit

    def __post_init__(self) -> None:
        if self.build not in ("auto", "always", "never"):
            raise ValueError(f"data.vocab.build must be 'auto', 'always' or 'never', got {self.build!r}")
        _check_int("data.vocab", "min_count", self.min_count, 1)
        _check_int("data.vocab", "max_items", self.max_items, 0)


@dataclass
class DataConfig:
    path: str = ""  # directory of day=YYYY-MM-DD/*.parquet; empty means generate `synth` under output.dir
    synth: SynthConfig = field(default_factory=SynthConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    # held_out_day: train on the days before eval_day, evaluate that day's events. leave_one_out: per user,
    # the last event is the test target and the one before it the validation target (MovieLens protocol).
    split: Literal["held_out_day", "leave_one_out"] = "held_out_day"
    eval_day: Optional[str] = None  # YYYY-MM-DD held out for evaluation; None: the last day in the log
    train_days: int = 0  # training window: days before eval_day; 0 means all of them
    min_history: int = 1  # events a user needs before eval_day to be evaluated
    # Rows with bad values (null, negative id, item 0, timestamp outside its day) are skipped with a
    # warning, up to this fraction of a file's rows; beyond it the file stops the job. 0: any bad row stops it.
    max_bad_fraction: float = 0.001
    backend: Literal["ray", "arrow"] = "ray"  # sequence building and splitting: distributed or in-process
    shuffle_buffer: int = 8192  # training windows shuffled together by the loader
    prefetch: int = 2  # batches the loader's background thread prepares ahead (0: none, in the loop's thread)
    rows_per_bucket: int = 2_000_000  # events per group-by bucket when building sequences with Ray
    # The log's `ts` column: "timestamp" (timestamp[*, tz=UTC]) or integers counting s / ms / us / ns since
    # 1970-01-01 UTC; timestamp columns are read under any setting (data.schema.check_schema).
    ts_unit: Literal["timestamp", "s", "ms", "us", "ns"] = "timestamp"

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise ValueError(f"data.path must be a string, got {self.path!r}")
        if not isinstance(self.synth, SynthConfig):
            raise ValueError(f"data.synth must be a SynthConfig, got {type(self.synth).__name__}")
        if not isinstance(self.vocab, VocabConfig):
            raise ValueError(f"data.vocab must be a VocabConfig, got {type(self.vocab).__name__}")
        if self.split not in ("held_out_day", "leave_one_out"):
            raise ValueError(f"data.split must be 'held_out_day' or 'leave_one_out', got {self.split!r}")
        _check_int("data", "train_days", self.train_days, 0)
        _check_int("data", "min_history", self.min_history, 1)
        if self.eval_day is not None:
            _check_date("data", "eval_day", self.eval_day)
        _check_float("data", "max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        if self.backend not in ("ray", "arrow"):
            raise ValueError(f"data.backend must be 'ray' or 'arrow', got {self.backend!r}")
        _check_int("data", "shuffle_buffer", self.shuffle_buffer, 1)
        _check_int("data", "prefetch", self.prefetch, 0)
        _check_int("data", "rows_per_bucket", self.rows_per_bucket, 1)
        if self.ts_unit not in ("timestamp", "s", "ms", "us", "ns"):
            raise ValueError(f"data.ts_unit must be 'timestamp', 's', 'ms', 'us' or 'ns', got {self.ts_unit!r}")
