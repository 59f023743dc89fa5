"""Synthetic generator: determinism, its statistics (Zipf, lagged repeats, new items, sessions) and the oracle."""

import datetime as dt
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from data.config import SynthConfig
from data.oracle import oracle_metrics
from data.schema import DAY_US, day_start_us
from data.sequences import build_sequences, list_parts, read_sequences
from data.synth import POP, REPEAT, Process, generate

CFG = SynthConfig(users=3000, items=2000, days=4, seed=7, events_per_user=150, users_per_chunk=700, workers=1)


def _log_table(log_dir) -> pa.Table:
    t = pads.dataset(str(log_dir), format="parquet", partitioning="hive").to_table()
    return t.sort_by([("user_id", "ascending"), ("ts", "ascending")])


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return generate(CFG, tmp_path_factory.mktemp("synth") / "log")


@pytest.fixture(scope="module")
def table(log):
    return _log_table(log)


def test_deterministic_for_a_seed_and_independent_of_workers(log, table, tmp_path):
    again = _log_table(generate(CFG, tmp_path / "again"))
    assert again.equals(table)
    parallel = _log_table(generate(SynthConfig(**{**CFG.__dict__, "workers": 2}), tmp_path / "parallel"))
    assert parallel.equals(table)
    other = _log_table(generate(SynthConfig(**{**CFG.__dict__, "seed": 8}), tmp_path / "other"))
    assert not other.column("item_id").equals(table.column("item_id"))


def test_popularity_follows_zipf(table):
    proc = Process.from_config(CFG)
    pop = table.filter(pa.compute.equal(table.column("src"), POP)).column("item_id").to_numpy()
    # Items active from the first day see the same normaliser all along: count ~ rank ** -s.
    counts = np.bincount(pop, minlength=CFG.items + 1)[1 : proc.n0 + 1]
    rank = proc.weight[1 : proc.n0 + 1] ** (-1.0 / CFG.zipf_s)
    head = counts >= 30  # enough events for a stable log-count
    slope = np.polyfit(np.log(rank[head]), np.log(counts[head]), 1)[0]
    assert head.sum() > 50
    assert slope == pytest.approx(-CFG.zipf_s, abs=0.08)


def test_repeats_happen_at_each_users_lag(log):
    seqs = read_sequences(build_sequences(log, log + "-seq", backend="arrow").out_dir)
    proc = Process.from_config(CFG)
    off, items = list_parts(seqs.column("item_ids"))
    lags = proc.lag(seqs.column("user_id").to_numpy())

    def match_rate(shift: int) -> float:
        hits = total = 0
        for r, lag in enumerate(lags):
            x = items[off[r] : off[r + 1]]
            if len(x) > lag + shift:
                hits += int((x[lag + shift :] == x[: len(x) - lag - shift]).sum())
                total += len(x) - lag - shift
        return hits / total

    at_lag, control = match_rate(0), match_rate(7)
    # The repeat component copies the item `lag` back with probability p_repeat; elsewhere only chance matches.
    assert at_lag == pytest.approx(CFG.p_repeat + control * (1 - CFG.p_repeat), abs=0.04)
    assert control < 0.1
    assert 50 <= lags.min() and lags.max() <= 400


def test_items_activate_over_time_and_events_stay_in_the_window(table):
    proc = Process.from_config(CFG)
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    start = day_start_us(CFG.start_day)
    day = (ts - start) // DAY_US
    assert day.min() >= 0 and day.max() < CFG.days
    item = table.column("item_id").to_numpy()
    assert (item >= 1).all() and (item <= proc.n_active[day]).all()
    assert (item > proc.n0).any()  # new items are consumed once active
    user = table.column("user_id").to_numpy()
    same = user[1:] == user[:-1]
    assert (np.diff(ts)[same] > 0).all()  # strictly increasing per user: no ties to break
    src = table.column("src").to_numpy()
    assert 0.02 < (src == REPEAT).mean() < CFG.p_repeat


def test_partitions_match_timestamps(log):
    for name in sorted(os.listdir(log)):
        if name.startswith("day="):
            t = pads.dataset(os.path.join(log, name), format="parquet").to_table()
            d = (t.column("ts").cast(pa.int64()).to_numpy() // DAY_US)
            assert set(d.tolist()) == {(dt.date.fromisoformat(name[4:]) - dt.date(1970, 1, 1)).days}


def _brute_force_metrics(log, day: str, ks) -> dict:
    """Rank every item by the generator's probability, one query at a time, written out plainly."""
    cfg = CFG
    proc = Process.from_config(cfg)
    d0 = day_start_us(day)
    n_active = proc.n_active[(dt.date.fromisoformat(day) - dt.date.fromisoformat(cfg.start_day)).days]
    seqs = read_sequences(build_sequences(log, log + "-oracle-seq", backend="arrow", overwrite=True).out_dir)
    off, all_items = list_parts(seqs.column("item_ids"))
    _, all_us = list_parts(seqs.column("ts"))
    ranks = []
    for r, user in enumerate(seqs.column("user_id").to_pylist()):
        items, us = all_items[off[r] : off[r + 1]], all_us[off[r] : off[r + 1]]
        e = int((us < d0).sum())  # events before the day
        if e < 1 or e >= len(us) or us[e] >= d0 + DAY_US:
            continue
        lag = int(proc.lag(np.array([user]))[0])
        w = {"pop": cfg.p_popularity, "tr": cfg.p_transition, "rep": cfg.p_repeat if e >= lag else 0.0}
        z = sum(w.values())
        p = np.zeros(cfg.items + 1)
        p[1 : n_active + 1] = w["pop"] / z * proc.weight[1 : n_active + 1] / proc.weight[1 : n_active + 1].sum()
        for k in range(cfg.neighbours):
            p[int(proc.successors(np.array([items[e - 1]]), np.array([k]))[0])] += w["tr"] / z / cfg.neighbours
        if e >= lag:
            p[items[e - lag]] += w["rep"] / z
        ranks.append(1 + int((p > p[items[e]]).sum()))
    r = np.array(ranks)
    out = {"queries": len(r), "mrr": float(np.mean(1 / r))}
    for k in ks:
        out[f"hr@{k}"] = float(np.mean(r <= k))
        out[f"ndcg@{k}"] = float(np.mean((r <= k) / np.log2(r + 1)))
    return out


def test_oracle_matches_brute_force_and_its_expectation(log):
    ks = (1, 10, 50)
    day = "2026-01-04"
    got = oracle_metrics(log, day, ks, backend="arrow")
    want = _brute_force_metrics(log, day, ks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    # Realised targets are draws from the distribution the expected metrics integrate over.
    for k in ks:
        se = np.sqrt(got[f"expected_hr@{k}"] * (1 - got[f"expected_hr@{k}"]) / got["queries"])
        assert abs(got[f"hr@{k}"] - got[f"expected_hr@{k}"]) < 4 * se + 1e-9
    assert got["expected_hr@1"] < got["expected_hr@10"] < got["expected_hr@50"] <= 1.0


def test_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "data.synth", "--users", "40", "--items", "30", "--days", "2", "--out", str(out),
           "--seed", "3", "--workers", "1"]
    env = dict(os.environ)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["events"] > 0
    meta = json.loads((out / "_synth.json").read_text())
    assert meta["config"]["seed"] == 3 and meta["events"] == summary["events"]
    bad_cmd = [sys.executable, "-m", "data.synth", "--users", "0", "--items", "3", "--days", "1", "--out",
               str(tmp_path / "x")]
    bad = subprocess.run(bad_cmd, capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "data.synth.users" in bad.stderr
