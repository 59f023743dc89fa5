"""Synthetic industrial behaviour logs whose next-event distribution is known in closed form.

    python -m data.synth --users 100000 --items 1000000 --days 14 --out /tmp/log [--seed 0]

The process (docs/data.md has the full definition). Items 1..I; item i is active from day
`activation_day(i)`: the first I - new_item_fraction*I ids from day 0, the rest in id order, evenly over
the days, so the active set on day d is the prefix 1..n_active[d]. User u has a repeat lag
Delta_u in [lag_min, lag_max] (a hash of seed and u). Its event number e (0-based) is, independently:
  popularity   item i with probability w_i / sum of active w, w_i = rank_i**-zipf_s, rank a random permutation
  transition   one of the `neighbours` successors of the previous item, uniformly (a successor of i is a
               hashed uniform draw from items 1..max(i, n_active[0]), so always active when i is)
  repeat       the item of event e - Delta_u
with probabilities (p_pop, p_transition, p_repeat), renormalised over the components that exist
(no previous item at e = 0, no repeat while e < Delta_u). Event times: sessions of about `session_len`
events a minute apart, spread over the days. Each row also carries `src` (0 pop, 1 transition, 2 repeat).

Work is split into chunks of `users_per_chunk` users, each with its own seeded generator, run in parallel
processes; output depends on the config only (not on the number of workers).
"""

import argparse
import dataclasses
import datetime as dt
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.config import SynthConfig
from data.schema import DAY_US, TS_TYPE, PathLike, day_start_us, list_days

META = "_synth.json"
POP, TRANSITION, REPEAT = 0, 1, 2
_MAX_EVENTS_FACTOR = 50  # events per user are clipped to this multiple of the mean
_GAP_S = 60.0  # mean seconds between events of a session
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-mixed uint64 hash, vectorised (uint64 arithmetic wraps)."""
    x = np.asarray(x, dtype=np.uint64) + _GOLD
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


# Hashed raw ids: a bijection of 1..2^40 into positive int64, x -> ((x ^ K) * A) mod 2^63 (A odd), so the
# oracle can map them back exactly.
_RAW_K, _RAW_A, _RAW_MASK = 0x2545F4914F6CDD1D, 0x9E3779B97F4A7C15, (1 << 63) - 1
_RAW_A_INV = pow(_RAW_A, -1, 1 << 63)


def hashed_ids(ids: np.ndarray) -> np.ndarray:
    x = np.asarray(ids, np.uint64) ^ np.uint64(_RAW_K)
    return ((x * np.uint64(_RAW_A)) & np.uint64(_RAW_MASK)).astype(np.int64)


def unhashed_ids(raw: np.ndarray) -> np.ndarray:
    x = (np.asarray(raw, np.int64).astype(np.uint64) * np.uint64(_RAW_A_INV)) & np.uint64(_RAW_MASK)
    return (x ^ np.uint64(_RAW_K)).astype(np.int64)


def raw_ids(ids: np.ndarray, kind: str, prefix: str) -> pa.Array:
    """Generator ids as the log writes them (data.synth.raw_ids)."""
    if kind == "hashed":
        return pa.array(hashed_ids(ids))
    if kind == "string":
        return pc.binary_join_element_wise(prefix, pa.array(ids).cast(pa.string()), "")
    return pa.array(np.asarray(ids, np.int64))


@dataclass
class GeneratorIds:
    """Raw ids of a synthetic log -> the generator's own ids (a data.schema.IdMapper for the oracle)."""

    kind: str
    oov: int = 0  # every raw id has a generator id

    def _back(self, raw: pa.Array, prefix: str) -> pa.Array:
        if self.kind == "hashed":
            return pa.array(unhashed_ids(raw.to_numpy(zero_copy_only=False)))
        if self.kind == "string":
            return pc.utf8_slice_codeunits(raw, len(prefix)).cast(pa.int64())
        return raw.cast(pa.int64())

    def items(self, raw: pa.Array) -> pa.Array:
        return self._back(raw, ITEM_PREFIX)

    def users(self, raw: pa.Array) -> pa.Array:
        return self._back(raw, USER_PREFIX)


ITEM_PREFIX, USER_PREFIX = "sku-", "user-"


def _unit(h: np.ndarray) -> np.ndarray:
    """uint64 hash -> float64 uniform in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


@dataclass
class Process:
    """Everything about the generator that does not depend on the user: the oracle rebuilds it from the config."""

    cfg: SynthConfig
    n_active: np.ndarray  # (days,) active items on each day: ids 1..n_active[d]
    weight: np.ndarray  # (items+1,) popularity weight, weight[0] = 0 (padding)
    cum: np.ndarray  # (items+1,) cum[i] = weight[1] + ... + weight[i]
    salt_succ: np.uint64
    salt_lag: np.uint64

    @classmethod
    def from_config(cls, cfg: SynthConfig) -> "Process":
        items, days = cfg.items, cfg.days
        n0 = max(1, items - int(round(cfg.new_item_fraction * items)))
        frac = np.arange(days) / max(1, days - 1)
        n_active = (n0 + np.floor((items - n0) * frac)).astype(np.int64)
        n_active[-1] = items
        rank = np.random.default_rng([cfg.seed, 1]).permutation(items).astype(np.float64) + 1.0
        weight = np.concatenate([[0.0], rank ** -cfg.zipf_s])
        salts = mix64(np.array([cfg.seed * 4 + 1, cfg.seed * 4 + 2], dtype=np.uint64))
        return cls(cfg, n_active, weight, np.cumsum(weight), salts[0], salts[1])

    @property
    def n0(self) -> int:
        return int(self.n_active[0])

    def lag(self, users: np.ndarray) -> np.ndarray:
        """Repeat lag Delta_u of each user, in events."""
        span = np.uint64(self.cfg.lag_max - self.cfg.lag_min + 1)
        return (mix64(np.asarray(users, np.uint64) ^ self.salt_lag) % span).astype(np.int64) + self.cfg.lag_min

    def successors(self, prev: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Successor number k of item `prev` (broadcasting): a hashed uniform item in 1..max(prev, n0)."""
        prev = np.asarray(prev, np.int64)
        key = prev.astype(np.uint64) * np.uint64(64) + np.asarray(k, np.uint64)
        pool = np.maximum(prev, self.n0)
        return 1 + np.minimum((_unit(mix64(key ^ self.salt_succ)) * pool).astype(np.int64), pool - 1)

    def mixture(self, e: np.ndarray, lag: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Component probabilities (pop, transition, repeat) of event number e, renormalised over those that exist."""
        c = self.cfg
        has_prev, has_rep = e >= 1, e >= lag
        p_pop = np.full(e.shape, c.p_popularity)
        p_tr = np.where(has_prev, c.p_transition, 0.0)
        p_rep = np.where(has_rep, c.p_repeat, 0.0)
        z = p_pop + p_tr + p_rep
        return p_pop / z, p_tr / z, p_rep / z


# ---------------------------------------------------------------- one chunk of users


def _event_counts(cfg: SynthConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    sigma = cfg.events_sigma  # log-normal spread (0: every user has events_per_user events)
    mu = np.log(cfg.events_per_user) - sigma**2 / 2  # so the mean is events_per_user
    e = np.rint(np.exp(mu + sigma * rng.standard_normal(n)))
    return np.clip(e, 2, _MAX_EVENTS_FACTOR * cfg.events_per_user).astype(np.int64)


def _timestamps(cfg: SynthConfig, rng: np.random.Generator, counts: np.ndarray) -> np.ndarray:
    """Strictly increasing event times per user (us since the epoch), all inside the log's days."""
    n, total = len(counts), int(counts.sum())
    span_us = cfg.days * DAY_US
    user = np.repeat(np.arange(n), counts)  # (N,)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # (n,) index of each user's first event
    is_first = np.zeros(total, bool)
    is_first[first] = True
    # Gaps (seconds): about a minute inside a session, long between sessions; spread sessions over the span.
    new_session = rng.random(total) < 1.0 / cfg.session_len
    mean_between = (span_us / 1e6) / np.maximum(1.0, counts / cfg.session_len)  # (n,)
    gap = np.where(new_session, rng.exponential(1.0, total) * mean_between[user], 1.0 + rng.exponential(_GAP_S, total))
    gap[is_first] = 0.0
    length = np.bincount(user, gap, minlength=n)  # (n,) seconds from first to last event
    scale = np.minimum(1.0, 0.98 * (span_us / 1e6) / np.maximum(length, 1e-9))  # fit heavy users in the span
    gap_us = np.maximum(1, np.rint(gap * scale[user] * 1e6)).astype(np.int64)
    gap_us[is_first] = 0
    local = np.cumsum(gap_us)
    local -= local[first][user]  # us since the user's first event
    room = np.maximum(0, span_us - 1 - local[first + counts - 1])  # (n,)
    start = (rng.random(n) * room).astype(np.int64)
    return day_start_us(cfg.start_day) + start[user] + local


def _items(proc: Process, rng: np.random.Generator, users: np.ndarray, counts: np.ndarray, day: np.ndarray):
    """Items and their source component for all events of a chunk (users' events contiguous, in time order)."""
    total = int(counts.sum())
    offs = np.concatenate([[0], np.cumsum(counts)[:-1]])  # (n,) first event of each user
    e = np.arange(total) - np.repeat(offs, counts)  # (N,) event number within its user
    lag = np.repeat(proc.lag(users), counts)  # (N,)
    # The component of every event depends only on (e, lag): drawn up front, vectorised.
    p_pop, p_tr, _ = proc.mixture(e, lag)
    r = rng.random(total)
    no_rep = e < lag  # also guards the float edge r ~ 1 while the repeat component does not exist yet
    src = np.where(r < p_pop, POP, np.where((r < p_pop + p_tr) | no_rep, TRANSITION, REPEAT)).astype(np.int8)
    # Popularity draws do not depend on the history either: one inverse-CDF search with sorted keys
    # (sorting makes the binary searches cache friendly: ~7x faster on 10^7 items).
    item = np.zeros(total, np.int64)
    pos = np.flatnonzero(src == POP)
    n_day = proc.n_active[day[pos]]
    x = rng.random(len(pos)) * proc.cum[n_day]
    order = np.argsort(x)
    drawn = np.empty(len(pos), np.int64)
    drawn[order] = np.searchsorted(proc.cum, x[order], side="right")
    item[pos] = np.minimum(drawn, n_day)
    k = rng.integers(0, proc.cfg.neighbours, total)  # successor choice, used by transitions only
    # Transitions and repeats depend on earlier items: event number by event number, all users at once.
    by_count = np.argsort(-counts, kind="stable")  # users with more events first: the active ones are a prefix
    active = len(counts) - np.cumsum(np.bincount(counts))  # (max+1,) users with more than `step` events
    for step in range(1, int(counts.max())):
        pos = offs[by_count[: active[step]]] + step
        c = src[pos]
        t = pos[c == TRANSITION]
        item[t] = proc.successors(item[t - 1], k[t])
        t = pos[c == REPEAT]
        item[t] = item[t - lag[t]]
    return item, src


def generate_chunk(proc: Process, chunk: int, out_dir: str) -> int:
    """Generate users of one chunk and write them, one file per day; returns the number of events."""
    cfg = proc.cfg
    lo = chunk * cfg.users_per_chunk + 1
    users = np.arange(lo, min(cfg.users, lo + cfg.users_per_chunk - 1) + 1, dtype=np.int64)
    rng = np.random.default_rng([cfg.seed, 2, chunk])
    counts = _event_counts(cfg, rng, len(users))
    ts = _timestamps(cfg, rng, counts)  # (N,) sorted within each user
    day = (ts - day_start_us(cfg.start_day)) // DAY_US
    item, src = _items(proc, rng, users, counts, day)
    table = pa.table(
        {
            "user_id": raw_ids(np.repeat(users, counts), cfg.raw_ids, USER_PREFIX),
            "item_id": raw_ids(item, cfg.raw_ids, ITEM_PREFIX),
            "ts": pa.array(ts).cast(TS_TYPE),
            "src": src,
        }
    )
    by_day = np.argsort(day, kind="stable")  # keeps (user, ts) order inside each day
    days, starts = np.unique(day[by_day], return_index=True)
    start_date = dt.date.fromisoformat(cfg.start_day)
    for d, a, b in zip(days, starts, [*starts[1:], len(by_day)]):
        path = os.path.join(out_dir, f"day={(start_date + dt.timedelta(days=int(d))).isoformat()}")
        os.makedirs(path, exist_ok=True)
        pq.write_table(table.take(by_day[a:b]), os.path.join(path, f"part-{chunk:06d}.parquet"))
    return len(item)


# ---------------------------------------------------------------- parallel driver

_WORKER_PROC: Optional[Process] = None


def _init_worker(cfg_dict: dict) -> None:
    global _WORKER_PROC
    _WORKER_PROC = Process.from_config(SynthConfig(**cfg_dict))


def _run_chunk(chunk: int, out_dir: str) -> int:
    assert _WORKER_PROC is not None
    return generate_chunk(_WORKER_PROC, chunk, out_dir)


def generate(cfg: SynthConfig, out_dir: PathLike) -> str:
    """Write the log to `out_dir` (must be empty or absent) plus `_synth.json`; returns out_dir.

    With more than one worker it spawns processes, so a calling script needs the usual
    `if __name__ == "__main__":` guard.
    """
    out_dir = os.fspath(out_dir)
    if os.path.isdir(out_dir) and any(not n.startswith((".", "_")) for n in os.listdir(out_dir)):
        raise ValueError(f"{out_dir} already holds data; synthetic logs are written to an empty directory")
    os.makedirs(out_dir, exist_ok=True)
    num_chunks = -(-cfg.users // cfg.users_per_chunk)
    workers = min(num_chunks, cfg.workers or os.cpu_count() or 1)
    t0 = time.perf_counter()
    if workers == 1:
        proc = Process.from_config(cfg)
        events = sum(generate_chunk(proc, c, out_dir) for c in range(num_chunks))
    else:
        # spawn, not fork: the caller may hold Ray or torch threads
        with ProcessPoolExecutor(workers, get_context("spawn"), _init_worker, (dataclasses.asdict(cfg),)) as pool:
            events = sum(pool.map(_run_chunk, range(num_chunks), [out_dir] * num_chunks))
    seconds = time.perf_counter() - t0
    meta = {
        "config": dataclasses.asdict(cfg),
        "events": events,
        "days": [d.isoformat() for d in list_days(out_dir)],
        "seconds": round(seconds, 3),
        "events_per_s": round(events / max(seconds, 1e-9)),
        "workers": workers,
    }
    with open(os.path.join(out_dir, META), "w") as f:
        json.dump(meta, f, indent=1)
    return out_dir


def load_meta(log_dir: PathLike) -> tuple[SynthConfig, dict]:
    path = os.path.join(os.fspath(log_dir), META)
    if not os.path.isfile(path):
        raise ValueError(f"{log_dir} has no {META}: the oracle needs a log written by data.synth")
    with open(path) as f:
        meta = json.load(f)
    return SynthConfig(**meta["config"]), meta


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--items", type=int, required=True)
    p.add_argument("--days", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--events-per-user", type=float, default=SynthConfig.events_per_user)
    p.add_argument("--events-sigma", type=float, default=SynthConfig.events_sigma,
                   help="log-normal sigma of the events per user (0: every user has --events-per-user)")
    p.add_argument("--start-day", default=SynthConfig.start_day)
    p.add_argument("--users-per-chunk", type=int, default=SynthConfig.users_per_chunk)
    p.add_argument("--workers", type=int, default=0)
    a = p.parse_args(argv)
    try:
        cfg = SynthConfig(
            users=a.users, items=a.items, days=a.days, seed=a.seed, events_per_user=a.events_per_user,
            events_sigma=a.events_sigma,
            start_day=a.start_day, users_per_chunk=a.users_per_chunk, workers=a.workers,
        )
        generate(cfg, a.out)
    except ValueError as e:
        p.error(str(e))
    _, meta = load_meta(a.out)
    print(json.dumps({k: meta[k] for k in ("events", "seconds", "events_per_s", "workers")}))


if __name__ == "__main__":
    main()
