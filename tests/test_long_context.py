"""The long-lag regime (configs/long-context.yaml): repeats hundreds to thousands of events back, the oracle
still exact there (including users whose history is shorter than their lag), and a signal that a model seeing
only the last 100 events cannot use."""

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from data.config import SynthConfig
from data.oracle import oracle_metrics
from data.schema import DAY_US, day_start_us
from data.synth import REPEAT, Process, _event_counts, _timestamps, generate
from trainer.config import load_config

ROOT = Path(__file__).resolve().parent.parent
# Lags 300-600, about 1,100 events before the held-out day on average; sigma 0.5 leaves some users with fewer
# events than their lag (no repeat component yet), so both cases of the oracle are exercised.
CFG = SynthConfig(users=48, items=1000, days=4, seed=11, events_per_user=1500, events_sigma=0.5, lag_min=300,
                  lag_max=600, p_repeat=0.5, p_transition=0.15, users_per_chunk=16, workers=1)
DAY = "2026-01-04"  # the last day
KS = (1, 10, 50)
WINDOW = 100  # what a short-context model sees


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return generate(CFG, tmp_path_factory.mktemp("long-lag") / "log")


@pytest.fixture(scope="module")
def users(log):
    """Per user, read plainly from the log files: (user, items, ts, src), events in time order."""
    t = pads.dataset(str(log), format="parquet", partitioning="hive").to_table()
    t = t.sort_by([("user_id", "ascending"), ("ts", "ascending")])
    user = t.column("user_id").to_numpy()
    item, src = t.column("item_id").to_numpy(), t.column("src").to_numpy()
    ts = t.column("ts").cast(pa.int64()).to_numpy()
    cuts = np.flatnonzero(np.diff(user)) + 1
    return [(int(u[0]), i, s, c) for u, i, s, c in zip(*(np.split(a, cuts) for a in (user, item, ts, src)))]


def _queries(users, proc: Process):
    """Held-out-day queries written out plainly: (items, e, lag, src of the target) per user with an event on
    DAY and at least one before it; the target is items[e]."""
    d0 = day_start_us(DAY)
    out = []
    for user, items, ts, src in users:
        e = int((ts < d0).sum())
        if e >= 1 and e < len(ts) and ts[e] < d0 + DAY_US:
            out.append((items, e, int(proc.lag(np.array([user]))[0]), int(src[e])))
    return out


def _brute_force(queries, proc: Process, window=None) -> tuple[dict, np.ndarray]:
    """Rank every item by the generator's next-event probability, one query at a time. With `window`, the
    predictor sees only the last `window` events: the repeat item counts only when it lies inside them (the
    process-aware ranking of a short-context model; not the exact Bayes rule for one)."""
    cfg = proc.cfg
    n_active = proc.n_active[(dt.date.fromisoformat(DAY) - dt.date.fromisoformat(cfg.start_day)).days]
    ranks, expected = [], {k: [] for k in KS}
    for items, e, lag, _ in queries:
        w_rep = cfg.p_repeat if e >= lag else 0.0
        z = cfg.p_popularity + cfg.p_transition + w_rep
        p = np.zeros(cfg.items + 1)
        p[1 : n_active + 1] = cfg.p_popularity / z * proc.weight[1 : n_active + 1] / proc.weight[1 : n_active + 1].sum()
        for k in range(cfg.neighbours):
            p[int(proc.successors(np.array([items[e - 1]]), np.array([k]))[0])] += cfg.p_transition / z / cfg.neighbours
        if e >= lag and (window is None or lag <= window):
            p[items[e - lag]] += w_rep / z
        ranks.append(1 + int((p > p[items[e]]).sum()))
        top = np.sort(p)[::-1]
        for k in KS:
            expected[k].append(top[:k].sum())
    r = np.array(ranks)
    out = {"queries": len(r), "mrr": float(np.mean(1 / r))}
    for k in KS:
        out[f"hr@{k}"] = float(np.mean(r <= k))
        out[f"ndcg@{k}"] = float(np.mean((r <= k) / np.log2(r + 1)))
        out[f"expected_hr@{k}"] = float(np.mean(expected[k]))
    return out, r


@pytest.fixture(scope="module")
def oracle(log):
    return oracle_metrics(log, DAY, KS, backend="arrow")


def test_repeats_sit_exactly_lag_back_and_only_once_the_history_reaches_it(users):
    proc = Process.from_config(CFG)
    short = long_ = 0
    for user, items, _, src in users:
        lag = int(proc.lag(np.array([user]))[0])
        assert CFG.lag_min <= lag <= CFG.lag_max
        rep = np.flatnonzero(src == REPEAT)
        assert (rep >= lag).all()  # no repeat component while e < lag
        np.testing.assert_array_equal(items[rep], items[rep - lag])
        if len(items) > lag:
            long_ += 1
            # a repeat at (almost) every p_repeat share of the events that can have one
            assert len(rep) / (len(items) - lag) == pytest.approx(CFG.p_repeat, abs=0.12)
        else:
            short += 1
    assert short >= 1 and long_ >= 30


def test_oracle_is_exact_with_lags_of_hundreds(users, oracle):
    proc = Process.from_config(CFG)
    queries = _queries(users, proc)
    # both cases: targets with a repeat component (e >= lag) and users still short of their lag
    assert sum(e >= lag for _, e, lag, _ in queries) >= 20 and sum(e < lag for _, e, lag, _ in queries) >= 3
    want, _ = _brute_force(queries, proc)
    assert oracle["queries"] == want["queries"] == len(queries)
    for key, value in want.items():
        assert oracle[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_the_full_history_beats_a_window_of_100_events(users, oracle):
    proc = Process.from_config(CFG)
    queries = _queries(users, proc)
    short, short_ranks = _brute_force(queries, proc, window=WINDOW)
    assert CFG.lag_min > WINDOW  # no lag fits in the window: short is the popularity + transition ranking
    # Repeat targets come from lag >= 300 events back; most are nowhere in the last 100 events.
    rep = [(items, e, lag) for items, e, lag, src in queries if src == REPEAT]
    assert len(rep) >= 10
    for items, e, lag in rep:
        assert items[e] == items[e - lag] and lag >= CFG.lag_min
    unseen = np.mean([items[e] not in items[e - WINDOW : e] for items, e, _ in rep])
    assert unseen > 0.6
    # The oracle puts every repeat target at rank 1 (P >= p_repeat / z beats any other item here) ...
    _, full_ranks = _brute_force(queries, proc)
    is_rep = np.array([src == REPEAT for *_, src in queries])
    assert (full_ranks[is_rep] == 1).all()
    # ... and its HR@10 is far above the short window's (0.92 against 0.56 on this log; expected 0.74 against 0.29).
    assert oracle["hr@10"] > short["hr@10"] + 0.15
    assert oracle["expected_hr@10"] > short["expected_hr@10"] + 0.15


def test_events_sigma_zero_gives_every_user_the_same_count(tmp_path):
    cfg = SynthConfig(users=30, items=50, days=2, events_per_user=37, events_sigma=0.0, workers=1)
    t = pads.dataset(str(generate(cfg, tmp_path / "log")), format="parquet", partitioning="hive").to_table()
    counts = np.bincount(t.column("user_id").to_numpy())[1:]
    assert (counts == 37).all() and len(counts) == 30
    with pytest.raises(ValueError, match=r"data\.synth\.events_sigma must be in"):
        SynthConfig(events_sigma=-0.1)
    # the default keeps the heavy tail of every earlier log
    heavy = _event_counts(SynthConfig(), np.random.default_rng(0), 5000)
    assert heavy.max() > 10 * heavy.mean()


def test_long_context_config_covers_every_lag():
    cfg = load_config(ROOT / "configs" / "long-context.yaml")
    m, s, d = cfg.model, cfg.data.synth, cfg.distributed
    assert m.mixer == "fft" and m.kernel_size == m.max_seq_len and d.activation_checkpointing
    # the evaluation query holds the last max_seq_len events: every lag fits, with the previous item
    assert s.lag_max < m.max_seq_len
    assert s.p_repeat >= 0.4 and s.p_transition <= 0.2  # the long-range signal dominates
    # nearly every evaluated user has lag_max events before the held-out day (chunk 0, exactly as generated)
    rng = np.random.default_rng([s.seed, 2, 0])
    counts = _event_counts(s, rng, min(s.users, s.users_per_chunk))
    ts = _timestamps(s, rng, counts)
    d_eval = day_start_us(s.start_day) + (s.days - 1) * DAY_US
    user = np.repeat(np.arange(len(counts)), counts)
    before = np.bincount(user, ts < d_eval, minlength=len(counts))
    assert np.mean(before >= s.lag_max) > 0.95
    assert np.mean(before >= Process.from_config(s).lag(np.arange(1, len(counts) + 1))) > 0.99


def test_long_sequence_benchmark_points_are_valid_configs(tmp_path):
    from benchmarks import long_sequence as bench

    args = type("Args", (), {"batch_size": 2, "steps": 4, "dwc_kernel": 64, "cpus_per_worker": 1.0,
                             "precision": "fp32", "dropout": 0.0})()
    for mixer in bench.MIXERS:
        for length in (8192, 16384, 32768):
            cfg = load_config(ROOT / "configs" / "smoke.yaml", [*bench.overrides(args, tmp_path, mixer, length),
                                                                 f"output.dir={tmp_path / 'run'}"])
            m = cfg.model
            assert (m.mixer, m.max_seq_len, m.dim) == (mixer, length, 64)
            assert m.kernel_size == {"fft": length, "dwc": 64, "attention": m.kernel_size}[mixer]
            assert cfg.distributed.activation_checkpointing and cfg.distributed.num_workers == 1
            assert cfg.training.max_steps == 4 and not cfg.eval.oracle and not cfg.eval.popularity_baseline
            # the loss logits stay small at the longest L (tests/test_cluster_deploy.py's bound is 2 GiB)
            assert cfg.training.batch_size * length * (1 + cfg.training.loss.num_negatives) * 4 < 2**28
