"""Tracking built in, on the driver, from the workers' reports (OUT/metrics.jsonl) and the final results;
workers write nothing of it.

- TensorBoard event files under OUT/tb/ (output.tensorboard, default true): train/loss, train/events_per_s
  and the learning rates train/lr_dense and train/lr_sparse (the records' lr/dense and lr/sparse) by step,
  valid/<metric> at each validation, and at the end heldout/<metric> (the held-out day, or the test split),
  baseline/<name>/<metric> and throughput/*; hr@10 is written hr_10. `tensorboard --logdir OUT/tb` shows them.
- MLflow (output.mlflow_uri, off by default): one run in experiment output.mlflow_experiment, named after
  output.dir, with the flattened config as params (model.dim, training.lr, ...), the same metrics under the
  same names and steps, and OUT/curves.png and results.json as artifacts; it ends FINISHED, or FAILED when
  the training fails.
- OUT/curves.png at the end of every run: the loss by step, and the validation metric by epoch (with the
  held-out metric and the baselines as lines).

The driver calls one `Trackers` (build_trackers): `record(r)` for every metrics.jsonl record while training
runs, `finish(results, artifacts)` at the end, `close()` when training failed.
"""

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence
from urllib.parse import urlparse

from trainer.config import MLFLOW_REMOTE, Config
from trainer.errors import UserError

TB_DIR = "tb"
CURVES = "curves.png"
# the records' learning-rate keys -> the name both trackers write
LR_KEYS = {"lr/dense": "train/lr_dense", "lr/sparse": "train/lr_sparse"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def tag(name: str) -> str:
    """TensorBoard tags and MLflow metric names allow letters, digits, _ - . and /: hr@10 is written hr_10
    (any other character too)."""
    return re.sub(r"[^A-Za-z0-9_\-./]", "_", name)


def record_scalars(r: dict[str, Any]) -> list[tuple[str, float]]:
    """The scalars of one metrics.jsonl record, by the name the trackers write."""
    out = [(f"train/{key}", r[key]) for key in ("loss", "events_per_s") if _number(r.get(key))]
    out += [(name, r[key]) for key, name in LR_KEYS.items() if _number(r.get(key))]
    out += [(tag(key), value) for key, value in r.items() if key.startswith("valid/") and _number(value)]
    return out


def result_scalars(results: dict[str, Any]) -> list[tuple[str, float]]:
    """The scalars of results.json: heldout/*, baseline/<name>/* and throughput/*."""
    out = [(tag(f"heldout/{key}"), value) for key, value in results.get("metrics", {}).items() if _number(value)]
    for name, metrics in (results.get("baselines") or {}).items():
        for key, value in (metrics if isinstance(metrics, dict) else {}).items():
            if _number(value):
                out.append((tag(f"baseline/{name}/{key}"), value))
    for key in ("events_per_s", "sequences_per_s"):
        value = results.get("throughput", {}).get(key)
        if _number(value):
            out.append((f"throughput/{key}", value))
    return out


class TensorBoard:
    """A tensorboardX SummaryWriter fed with metrics.jsonl records (`record`) and the results (`finish`)."""

    def __init__(self, log_dir: Path) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(log_dir), flush_secs=10)
        self.last_step = 0

    def record(self, r: dict[str, Any]) -> None:
        step = int(r.get("step", self.last_step))
        self.last_step = max(self.last_step, step)
        for name, value in record_scalars(r):
            self.writer.add_scalar(name, value, step, walltime=r.get("time"))

    def finish(self, results: dict[str, Any], artifacts: Sequence[Path] = ()) -> None:
        """`artifacts`: for the trackers that store files (MLflow); TensorBoard has no use for them."""
        step = int(results.get("throughput", {}).get("steps", self.last_step))
        for name, value in result_scalars(results):
            self.writer.add_scalar(name, value, step)
        self.close()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


# ---------------------------------------------------------------- MLflow


def is_file_store(uri: str) -> bool:
    return uri not in MLFLOW_REMOTE[2:] and urlparse(uri).scheme.lower() in ("", "file")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model": {"dim": 64}} -> {"model.dim": "64"}; lists and empty sections as JSON."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple, dict)):
            out[f"{prefix}{key}"] = json.dumps(value, default=str)
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class MLflow:
    """One MLflow run fed with metrics.jsonl records (`record`) and the results (`finish`), through an
    MlflowClient on `uri` (no fluent mlflow.start_run: no global active run, nothing shared between runs or
    tests). `params`: the config tree, logged flattened. The run ends FINISHED in `finish`, FAILED in `close`.
    """

    TRUNCATED = "...[truncated]"

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, Any],
                 tags: Optional[dict[str, str]] = None) -> None:
        if is_file_store(uri):
            # MLflow 3 refuses the file store ("maintenance mode") unless opted in; skinny has no database store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            if not urlparse(uri).scheme:  # a plain path: absolute, so the run's artifact location is too
                uri = Path(uri).expanduser().resolve().as_uri()
        # MLflow posts usage telemetry from background threads unless told not to (clusters are often offline)
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self._Metric = Metric
        self._max_metrics, self._max_params = MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self._lock = threading.Lock()  # record() runs in the progress thread, close() in the driver's
        self.ended = False
        self.last_step = 0
        found = self.client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {experiment!r} at {uri} is deleted: restore it "
                             "(mlflow experiments restore) or set output.mlflow_experiment to another name")
        experiment_id = found.experiment_id if found is not None else self._create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        try:
            limit = MAX_PARAM_VAL_LENGTH
            values = {k: v if len(v) <= limit else v[:limit - len(self.TRUNCATED)] + self.TRUNCATED
                      for k, v in flatten(params).items()}  # MLflow refuses longer values
            for batch in _chunks([Param(k, v) for k, v in values.items()], self._max_params):
                self.client.log_batch(self.run_id, params=batch, synchronous=True)
        except BaseException:
            self.close()
            raise

    def _create_experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name)
        except MlflowException:  # created meanwhile by another run
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _log(self, scalars: list[tuple[str, float]], step: int, timestamp_ms: int) -> None:
        metrics = [self._Metric(name, float(value), timestamp_ms, step) for name, value in scalars]
        with self._lock:
            for batch in _chunks(metrics, self._max_metrics):
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def record(self, r: dict[str, Any]) -> None:
        step = int(r.get("step", self.last_step))
        self.last_step = max(self.last_step, step)
        when = r["time"] if _number(r.get("time")) else time.time()
        scalars = record_scalars(r)
        if scalars:
            self._log(scalars, step, int(when * 1000))

    def finish(self, results: dict[str, Any], artifacts: Sequence[Path] = ()) -> None:
        """The results' metrics, the files among `artifacts` that exist (OUT/curves.png, results.json), and
        the run ends FINISHED; FAILED if any of that fails."""
        try:
            step = int(results.get("throughput", {}).get("steps", self.last_step))
            self._log(result_scalars(results), step, int(time.time() * 1000))
            for path in artifacts:
                if Path(path).is_file():
                    self.client.log_artifact(self.run_id, str(path))
            self._end("FINISHED")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """End the run FAILED unless it has ended (after a failure; a second call does nothing)."""
        self._end("FAILED")

    def _end(self, status: str) -> None:
        with self._lock:
            if not self.ended:
                self.ended = True
                self.client.set_terminated(self.run_id, status)


# ---------------------------------------------------------------- the driver's one object


class Trackers:
    """Fans record/finish/close out to every tracker; one tracker's failure does not skip the others (record
    and finish raise the first error after all have been called; close logs it)."""

    def __init__(self, trackers: Iterable[Any] = ()) -> None:
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, call: str, *args: Any) -> None:
        error: Optional[BaseException] = None
        for tracker in self.trackers:
            try:
                getattr(tracker, call)(*args)
            except Exception as e:
                error = error or e
        if error is not None:
            raise error

    def record(self, r: dict[str, Any]) -> None:
        self._each("record", r)

    def finish(self, results: dict[str, Any], artifacts: Sequence[Path] = ()) -> None:
        self._each("finish", results, artifacts)

    def close(self) -> None:
        """After a failure: never raises, so the training error is the one the driver reports."""
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as e:
                logging.getLogger(__name__).warning("closing %s: %s: %s", type(tracker).__name__,
                                                    type(e).__name__, e)


def build_trackers(cfg: Config, out: Path) -> list[Any]:
    """TensorBoard under OUT/tb (output.tensorboard) and an MLflow run (output.mlflow_uri), named after
    output.dir, with the config as params. An MLflow store that cannot be opened is a UserError, said before
    training starts; the TensorBoard writer already opened is closed then."""
    trackers: list[Any] = []
    if cfg.output.tensorboard:
        trackers.append(TensorBoard(Path(out) / TB_DIR))
    if cfg.output.mlflow_uri:
        try:
            trackers.append(MLflow(cfg.output.mlflow_uri, cfg.output.mlflow_experiment, Path(out).name,
                                   cfg.to_dict(), tags={"convformer.output_dir": str(out)}))
        except Exception as e:
            Trackers(trackers).close()
            raise UserError(f"output.mlflow_uri={cfg.output.mlflow_uri!r}: cannot start an MLflow run: "
                            f"{type(e).__name__}: {e}") from e
    return trackers


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
