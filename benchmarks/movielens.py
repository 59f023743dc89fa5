"""Leave-one-out MovieLens runs through the full trainer (Ray Train, TorchRec, DeepSpeed), one after
another, collected into one JSON with wall time and hardware per run.

    make movielens   # fetch the data once
    python -m benchmarks.movielens --out benchmarks/results/movielens-cpu.json \\
        --run ml-1m-convformer-f --run ml-1m-sasrec --run ml-1m-convformer-f:bce=training.loss.type=bce

A run is `CONFIG[:NAME=OVERRIDE,...]` where CONFIG names configs/movielens/CONFIG.yaml. Runs already in the
output file are skipped (delete an entry to redo it); each finished run is written at once.
`python -m benchmarks.movielens --table` prints the results as the README's markdown table.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.results import provenance
from trainer.config import load_config
from trainer.driver.launch import run


def parse_run(spec: str) -> tuple[str, str, list[str]]:
    """'ml-1m-sasrec' or 'ml-1m-sasrec:bce=training.loss.type=bce,training.epochs=5' -> (key, config, overrides)."""
    config, _, rest = spec.partition(":")
    if not rest:
        return config, config, []
    label, _, overrides = rest.partition("=")
    if not overrides:
        raise ValueError(f"--run {spec!r}: expected CONFIG:LABEL=key=value[,key=value...]")
    return f"{config}:{label}", config, overrides.split(",")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    return {"cpu": cpu_name(), "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__}


MODELS = {"convformer-f": "ConvFormer-F (fft, K=L=200)", "convformer": "ConvFormer (dwc, K=50)",
          "sasrec": "our SASRec (attention)"}


def lever(key: str, r: dict[str, Any]) -> str:
    """What a run changed from its config: the overrides, or 'config defaults'."""
    return ", ".join(o.split(".", 1)[-1] for o in r["overrides"]) or "config defaults"


def milestones(metrics_log: Path, since: float, select: str) -> list[dict[str, Any]]:
    """Every validation of a run from its metrics.jsonl: epoch, step, seconds since `since` (wall clock at
    the run's start) and the validation metrics, in order."""
    out = []
    for line in metrics_log.read_text().splitlines() if metrics_log.is_file() else []:
        r = json.loads(line)
        if f"valid/{select}" in r and r["time"] >= since:
            out.append({"epoch": r["epoch"], "step": r["step"], "s": round(r["time"] - since, 1),
                        **{k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("valid/")}})
    return out


def first_reaching(validations: list[dict[str, Any]], metric: str, levels: list[float]) -> dict[str, Any]:
    """Seconds to the first validation at or above each level of `metric` (None: never reached)."""
    return {f"{lvl:.2f}": next((v["s"] for v in validations if v[metric] >= lvl), None) for lvl in levels}


def table(done: dict[str, Any]) -> str:
    keys = ["hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr"]
    lines = ["| data | model | lever | valid NDCG@10 | " + " | ".join(f"test {k.upper()}" for k in keys)
             + " | best / last epoch | wall time | load |", "|" + "---|" * (len(keys) + 7)]
    for key, r in sorted(done.items(), key=lambda kv: (kv[0].split("-")[1] != "1m", kv[0])):
        config = key.split(":")[0]
        data, model = config.split("-", 2)[:2], config.split("-", 2)[2]
        cells = " | ".join(f"{r['test'][k]:.4f}" for k in keys)
        load = r.get("load_average_before")
        lines.append(f"| {'-'.join(data)} | {MODELS.get(model, model)} | {lever(key, r)} | "
                     f"{r['validation']['metrics']['ndcg@10']:.4f} | {cells} | "
                     f"{r['validation']['best_epoch']} / {r['throughput']['epochs_completed']} | "
                     f"{r['wall_s'] / 60:.0f} min | {'' if load is None else f'{load[0]:.1f}'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/movielens-cpu.json")
    p.add_argument("--run", action="append", default=[], help="CONFIG[:LABEL=key=value,...]")
    p.add_argument("--runs-dir", default="runs/movielens", help="output.dir of each run goes under here")
    p.add_argument("--table", action="store_true", help="print the results file as a markdown table and exit")
    args = p.parse_args()

    out = Path(args.out)
    done: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    if args.table:
        print(table(done))
        return
    for spec in args.run:
        key, config, overrides = parse_run(spec)
        if key in done:
            print(f"{key}: already in {out}, skipped", flush=True)
            continue
        run_dir = Path(args.runs_dir) / key.replace(":", "-")
        cfg = load_config(f"configs/movielens/{config}.yaml", [*overrides, f"output.dir={run_dir}"])
        load_before, since, t0 = os.getloadavg(), time.time(), time.perf_counter()
        results = run(cfg, resume=(run_dir / "ray").exists())
        validations = milestones(run_dir / "metrics.jsonl", since, cfg.eval.select)
        done[key] = {
            "config": f"configs/movielens/{config}.yaml", "overrides": overrides,
            "command": " ".join(["python -m trainer.train --config", f"configs/movielens/{config}.yaml", *overrides]),
            "wall_s": round(time.perf_counter() - t0, 1), "hardware": hardware(),
            **{k: v for k, v in provenance(load_before).items() if k != "machine"},
            "validations": validations,
            "valid_ndcg@10_first_reached_s": first_reaching(validations, "ndcg@10", [0.15, 0.17, 0.18, 0.19]),
            "test": results["metrics"], "validation": results["validation"],
            "popularity": results["baselines"].get("popularity"), "throughput": results["throughput"],
            "data": {k: results["data"][k] for k in ("num_train_users", "num_eval_queries", "num_valid_queries")},
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(done, indent=1) + "\n")
        m = results["metrics"]
        print(f"{key}: HR@10 {m['hr@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}  "
              f"(best epoch {results['validation']['best_epoch']}, {done[key]['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
