"""Sequence building: our Ray Data path against DuckDB on the same synthetic Parquet log, one run each.

    python -m benchmarks.sequences --events 5000000 --out benchmarks/results/sequences-cpu.json

Both read the day-partitioned log and write one Parquet row per user (user_id, item ids and timestamps in
time order). Ours also validates every row (schema, ids, timestamps inside their day). Ray start-up is
excluded (paid once per job), the Ray Data job itself (task start, shuffle, write) is included.
"""

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from typing import Optional

import pyarrow.parquet as pq

from data.config import SynthConfig
from data.sequences import build_sequences
from data.synth import generate

EVENTS_PER_USER = 100


def run_duckdb(log_dir: str, out_path: str, threads: int) -> tuple[float, int]:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads TO {threads}")
    t0 = time.perf_counter()
    con.execute(
        f"""COPY (
              SELECT user_id, list(item_id ORDER BY ts, item_id) AS item_ids, list(ts ORDER BY ts, item_id) AS ts
              FROM read_parquet('{log_dir}/day=*/*.parquet', hive_partitioning = false)
              GROUP BY user_id
            ) TO '{out_path}' (FORMAT parquet)"""
    )
    seconds = time.perf_counter() - t0
    return seconds, pq.ParquetFile(out_path).metadata.num_rows


def run_ours(log_dir: str, out_dir: str, warmup_log: str) -> tuple[float, int]:
    from data.ray_utils import ensure_ray

    ensure_ray()
    # Warm-up on a tiny log: starts Ray's worker processes and imports, paid once per job like ray.init.
    build_sequences(warmup_log, out_dir + "-warmup", backend="ray")
    t0 = time.perf_counter()
    stats = build_sequences(log_dir, out_dir, backend="ray")
    return time.perf_counter() - t0, stats.num_users


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=float, default=5e6)
    p.add_argument("--out", required=True)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--work-dir", default=None, help="where the log is written (default: a temporary directory)")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    work = a.work_dir or tempfile.mkdtemp(prefix="seqbench-")
    try:
        log_dir = os.path.join(work, "log")
        users = max(1, int(a.events) // EVENTS_PER_USER)
        cfg = SynthConfig(users=users, items=a.items, days=a.days, events_per_user=EVENTS_PER_USER)
        t0 = time.perf_counter()
        generate(cfg, log_dir)
        gen_s = time.perf_counter() - t0
        events = sum(pq.ParquetFile(os.path.join(r, f)).metadata.num_rows
                     for r, _, fs in os.walk(log_dir) for f in fs if f.endswith(".parquet"))
        load_before = os.getloadavg()[0]
        duck_s, duck_users = run_duckdb(log_dir, os.path.join(work, "duck.parquet"), os.cpu_count() or 1)
        warm_log = generate(SynthConfig(users=200, items=100, days=2, workers=1), os.path.join(work, "warmup"))
        ours_s, our_users = run_ours(log_dir, os.path.join(work, "ours"), warm_log)
        if duck_users != our_users:
            raise SystemExit(f"user counts differ: duckdb {duck_users}, ours {our_users}")
        result = {
            "events": events,
            "users": our_users,
            "items": a.items,
            "generate_s": round(gen_s, 2),
            "ours_ray_data": {"seconds": round(ours_s, 2), "events_per_s": round(events / ours_s)},
            "duckdb": {"seconds": round(duck_s, 2), "events_per_s": round(events / duck_s)},
            "ratio_ours_over_duckdb": round(duck_s / ours_s, 3),
            "target_ratio": 0.5,
            # the 1-minute load average: other jobs on the machine slow both sides
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2)},
        }
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result))
    finally:
        if a.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
