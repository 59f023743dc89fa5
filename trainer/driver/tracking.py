"""Tracking built in, on the driver, from the workers' reports (OUT/metrics.jsonl) and the final results;
workers write nothing of it.

- TensorBoard event files under OUT/tb/ (output.tensorboard, default true): train/loss and
  train/events_per_s by step, valid/<metric> at each validation, and at the end heldout/<metric> (the
  held-out day, or the test split), baseline/<name>/<metric> and throughput/*; hr@10 is written hr_10.
  `tensorboard --logdir OUT/tb` shows them.
- OUT/curves.png at the end of every run: the loss by step, and the validation metric by epoch (with the
  held-out metric and the baselines as lines).
"""

import json
from pathlib import Path
from typing import Any, Optional

TB_DIR = "tb"
CURVES = "curves.png"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def tag(name: str) -> str:
    """TensorBoard tags allow letters, digits, _ - . and /: hr@10 is written hr_10."""
    return name.replace("@", "_")


class TensorBoard:
    """A tensorboardX SummaryWriter fed with metrics.jsonl records (`record`) and the results (`finish`)."""

    def __init__(self, log_dir: Path) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(log_dir), flush_secs=10)
        self.last_step = 0

    def record(self, r: dict[str, Any]) -> None:
        step = int(r.get("step", self.last_step))
        self.last_step = max(self.last_step, step)
        walltime = r.get("time")
        for key in ("loss", "events_per_s"):
            if _number(r.get(key)):
                self.writer.add_scalar(f"train/{key}", r[key], step, walltime=walltime)
        for key, value in r.items():
            if key.startswith("valid/") and _number(value):
                self.writer.add_scalar(tag(key), value, step, walltime=walltime)

    def finish(self, results: dict[str, Any]) -> None:
        step = int(results.get("throughput", {}).get("steps", self.last_step))
        for key, value in results.get("metrics", {}).items():
            if _number(value):
                self.writer.add_scalar(tag(f"heldout/{key}"), value, step)
        for name, metrics in (results.get("baselines") or {}).items():
            for key, value in (metrics if isinstance(metrics, dict) else {}).items():
                if _number(value):
                    self.writer.add_scalar(tag(f"baseline/{name}/{key}"), value, step)
        for key in ("events_per_s", "sequences_per_s"):
            value = results.get("throughput", {}).get(key)
            if _number(value):
                self.writer.add_scalar(f"throughput/{key}", value, step)
        self.close()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def read_records(metrics_log: Path) -> list[dict[str, Any]]:
    if not Path(metrics_log).exists():
        return []
    return [json.loads(line) for line in Path(metrics_log).read_text().splitlines() if line.strip()]


def plot_curves(metrics_log: Path, path: Path, select: str, results: Optional[dict[str, Any]] = None) -> Path:
    """OUT/curves.png: loss by step (epoch ends marked) and the validation `select` metric by epoch, with
    the held-out value and the baselines as horizontal lines. The whole log, so a resumed run's curves
    include the steps before the interruption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics_log)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["epoch"], r[f"valid/{select}"]) for r in records if f"valid/{select}" in r]
    epoch_ends = sorted({r["step"] for r in records if "checkpoint" in r and "loss" not in r})

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    if losses:
        ax_loss.plot(*zip(*losses), marker=".", label="training loss")
    for step in epoch_ends:
        ax_loss.axvline(step, color="grey", lw=0.5, ls=":")
    ax_loss.set(xlabel="step (dotted: checkpoints)", ylabel="loss", title="training loss")
    if valid:
        ax_metric.plot(*zip(*valid), marker="o", label=f"validation {select}")
    results = results or {}
    lines = {"model (held-out)": results.get("metrics", {}).get(select),
             **{name: m.get(select) for name, m in (results.get("baselines") or {}).items() if isinstance(m, dict)}}
    for i, (name, value) in enumerate((n, v) for n, v in lines.items() if _number(v)):
        ax_metric.axhline(value, color=f"C{i + 1}", ls="--", label=f"{name} {value:.4f}")
    last_epoch = max([r.get("epoch", 0) for r in records] + [1])
    ax_metric.set_xlim(0, last_epoch)
    ax_metric.set(xlabel="epoch", ylabel=select, title=f"validation {select} by epoch" if valid
                  else f"{select}: held-out and baselines (no validation split)")
    if ax_metric.get_legend_handles_labels()[0]:
        ax_metric.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
