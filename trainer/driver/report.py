"""results.json and the metrics table printed at the end of a run."""

import json
from pathlib import Path
from typing import Any, Optional

from trainer import storage
from trainer.storage import Location

RESULTS_MARKER = "CONVFORMER_RESULTS_JSON "  # cluster.submit finds results.json in a job's log by this


def write_results(results: dict[str, Any], out_dir: Path, also_to: Optional[Location] = None) -> Path:
    """OUT/results.json, and the same file under `also_to` (the storage location: a directory or a URI).
    Readers never see a half-written file."""
    data = (json.dumps(results, indent=2, default=str) + "\n").encode()
    path = Path(out_dir) / "results.json"
    storage.write_bytes(path, data)
    if also_to is not None:
        storage.write_bytes(storage.join(also_to, "results.json"), data)
    return path


def _metric_keys(rows: dict[str, dict[str, float]]) -> list[str]:
    keys: list[str] = []
    for metrics in rows.values():
        keys += [k for k in metrics if k not in keys]
    # hr@k, ndcg@k by k, then mrr, then recall@k
    def order(key: str) -> tuple:
        name, _, k = key.partition("@")
        rank = {"hr": 0, "ndcg": 1, "mrr": 2, "recall": 3}.get(name, 4)
        return (rank, int(k) if k.isdigit() else 0)

    return sorted(keys, key=order)


def format_table(results: dict[str, Any]) -> str:
    """Rows: model, baselines; columns: metrics. The model also as a fraction of the oracle, when known."""
    selection = results.get("validation")
    rows = {"model": results["metrics"], **results.get("baselines", {})}
    if selection:  # leave-one-out: the rows above are test metrics of the weights chosen on validation
        rows["valid (best)"] = selection["metrics"]
    keys = _metric_keys({"model": results["metrics"]})
    lines = [f"{'':<12}" + "".join(f"{k:>11}" for k in keys)]
    for name, metrics in rows.items():
        lines.append(f"{name:<12}" + "".join(f"{metrics.get(k, float('nan')):>11.4f}" for k in keys))
    oracle = results.get("baselines", {}).get("oracle")
    if oracle:
        fractions = {k: results["metrics"][k] / oracle[k] for k in keys if oracle.get(k) and k in results["metrics"]}
        lines.append(f"{'model/oracle':<12}" + "".join(f"{fractions.get(k, float('nan')):>11.3f}" for k in keys))
    if selection:
        lines.append(f"weights of epoch {selection['best_epoch']}, best validation {selection['select']}"
                     + (" (stopped early)" if selection["stopped_early"] else ""))
    data = results.get("data") or {}
    if data.get("oov_eval_targets"):
        n, total = data["oov_eval_targets"], data["num_eval_queries"]
        lines.append(f"{n:,} of {total:,} evaluation targets ({n / total:.1%}) are outside the vocabulary "
                     f"({data['vocab_summary']['items']:,} items): each counts as a miss")
    tp = results.get("throughput", {})
    if tp:
        lines.append(
            f"training: {tp.get('events_per_s', 0):,.0f} events/s, {tp.get('sequences_per_s', 0):,.1f} sequences/s; "
            + ", ".join(f"{k} {v:.1f}s" for k, v in results.get("phases_s", {}).items())
        )
    moved = tp.get("restored_from_workers")
    if moved and moved != results.get("world_size"):
        lines.append(f"resumed a checkpoint of {moved} workers on {results.get('world_size')}: table, optimizer "
                     "state and data position resharded, checksums verified")
    return "\n".join(lines)


def print_table(results: dict[str, Any]) -> None:
    print(format_table(results), flush=True)
