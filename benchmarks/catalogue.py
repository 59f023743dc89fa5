"""Large catalogues end to end on this box: `python -m trainer.train` on configs/catalogue.yaml (D=64, 2 workers,
row-wise table, one epoch, popularity and oracle baselines, the full-catalogue held-out-day evaluation of every
query) at catalogue sizes N, one subprocess per point, and beside them the ranking's rate against one plain
matmul + topk over the same rows (benchmarks/ranking.py, measured in the same invocation).

    python -m benchmarks.catalogue --items 1000000 10000000 50000000 --out benchmarks/results/catalogue-cpu.json

Points already in --out and not named again are kept, so sizes can be measured in separate invocations. Each
run's output directory (a checkpoint of the whole table: 13 GB at 5x10^7) is deleted after its results are read.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.ranking import compare
from benchmarks.results import provenance, write_result
from trainer.config import load_config

CONFIG = "configs/catalogue.yaml"


def run_point(items: int, out_root: Path, limit_s: float) -> dict[str, Any]:
    out_dir = out_root / str(items)
    shutil.rmtree(out_dir, ignore_errors=True)
    overrides = [f"model.num_items={items}", f"data.synth.items={items}", f"output.dir={out_dir}"]
    cfg = load_config(CONFIG, overrides)
    rows = -(-(items + 1) // cfg.distributed.num_workers)  # row-wise: an even split of the N + 1 rows
    record: dict[str, Any] = {
        "items": items,
        "command": " ".join(["python -m trainer.train --config", CONFIG, *overrides[:2]]),
        # fp32 rows and row-wise Adagrad's one fp32 per row
        "table_bytes_per_worker": rows * cfg.model.dim * 4,
        "optimizer_state_bytes_per_worker": rows * 4,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "commit": provenance(os.getloadavg())["commit"],  # points may come from separate invocations
    }
    t0 = time.perf_counter()
    log = out_root / f"{items}.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, "-m", "trainer.train", "--config", CONFIG, *overrides],
                                  stdout=f, stderr=subprocess.STDOUT, timeout=limit_s)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}): {_last_line(log)}"
    except subprocess.TimeoutExpired:
        status = f"time_limit ({limit_s:.0f} s)"
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    record["status"] = status
    record["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results = out_dir / "results.json"
    if results.exists():
        r = json.loads(results.read_text())
        record.update({
            "phases_s": {k: round(v, 1) for k, v in r["phases_s"].items()},
            "peak_rss_bytes_per_worker": r["peak_memory_bytes_per_worker"],
            "eval_queries": r["data"]["num_eval_queries"],
            "eval_seconds": round(r["phases_s"]["eval"], 1),
            "train_events": r["throughput"]["events"],
            "events_per_s": round(r["throughput"]["events_per_s"]),
            "items_in_log": r["data"]["num_items"],  # rows the log's vocabulary fills; the rest never train
            "oov_eval_targets": r["data"].get("oov_eval_targets"),  # held-out targets new to the vocabulary
            "hr@10": {"model": r["metrics"]["hr@10"], **{k: v["hr@10"] for k, v in r["baselines"].items()}},
        })
    else:
        record.update({"phases_s": None, "peak_rss_bytes_per_worker": None, "eval_queries": None,
                       "eval_seconds": None})
    shutil.rmtree(out_dir, ignore_errors=True)
    return record


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, nargs="*", default=[1_000_000, 10_000_000, 50_000_000])
    p.add_argument("--out", default="benchmarks/results/catalogue-cpu.json")
    p.add_argument("--runs", default="runs/catalogue", help="where the runs write (deleted after each)")
    p.add_argument("--limit-s", type=float, default=5400.0, help="per point")
    p.add_argument("--ratio-items", type=int, default=10_000_000, help="0: keep the ratio already in --out")
    p.add_argument("--ratio-queries", type=int, default=1024)
    a = p.parse_args()
    out = Path(a.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    load = os.getloadavg()
    result: dict[str, Any] = {
        "benchmark": "trainer.train on configs/catalogue.yaml per catalogue size (D=64, 2 workers, row-wise), "
                     "full-catalogue held-out-day evaluation of every query, with popularity and oracle",
        "records": [r for r in old.get("records", []) if r["items"] not in a.items],
    }
    for key in ("eval_vs_matmul_topk", "ranking"):
        if key in old:
            result[key] = old[key]
    Path(a.runs).mkdir(parents=True, exist_ok=True)
    for items in a.items:
        result["records"].append(run_point(items, Path(a.runs), a.limit_s))
        result["records"].sort(key=lambda r: r["items"])
        write_result({**result, **provenance(load)}, a.out)  # after every point
    if a.ratio_items:
        torch.set_num_threads(2)
        result["ranking"] = compare(a.ratio_items, a.ratio_queries)
        result["eval_vs_matmul_topk"] = result["ranking"]["eval_vs_matmul_topk"]
    write_result({**result, **provenance(load)}, a.out)


if __name__ == "__main__":
    main()
