"""The driver: connect to Ray, size the item table, prepare the data, run the TorchTrainer, add baselines,
write results.json.

Prepared data, results.json and metrics.jsonl go to output.dir; Ray Train's storage (checkpoints) to
output.storage (a local path or a pyarrow URI, default OUT/ray), which also gets copies of results.json and
metrics.jsonl when set."""

import os
import time
from pathlib import Path
from typing import Any, Optional

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from data.prepare import PreparedData, prepare
from data.ray_utils import ensure_ray
from data.schema import list_days
from trainer import storage
from trainer.checkpoint import check_resumable
from trainer.config import Config
from trainer.driver.callbacks import build_callbacks
from trainer.driver.console import LOG_DIR, Console, Count, Progress, estimate_steps_per_epoch
from trainer.driver.report import write_results
from trainer.driver.tracking import CURVES, Trackers, build_trackers, plot_curves
from trainer.errors import UserError, user_input
from trainer.evaluation.baselines import baselines
from trainer.logs import quiet
from trainer.storage import Location
from trainer.worker.entry import train_worker

RUN_NAME = "train"


def connect_ray(cfg: Config, log_to_driver: bool = True) -> None:
    """Join RAY_ADDRESS if set (a cluster, or a job's own cluster), else start a new local instance.

    Workers take fractional CPUs so Ray Data's read tasks still get some (a full reservation on 2 cores
    backpressures forever: docs/dependencies.md); check_resources refuses over-subscription.
    `log_to_driver=False`: worker output stays in Ray's logs and OUT/logs/, off the console
    (trainer/driver/console.py)."""
    quiet()
    ensure_ray(runtime_env={"worker_process_setup_hook": "trainer.logs.quiet"}, log_to_driver=log_to_driver)
    check_resources(cfg)


def size_item_table(cfg: Config, data: PreparedData) -> None:
    """model.num_items from the data when it is 0 (the vocabulary's size, or a dense log's largest id); when
    given, it must hold every item of the data."""
    if cfg.model.num_items == 0:
        cfg.model.num_items = data.num_items
    elif data.num_items > cfg.model.num_items:
        what = "vocabulary size" if data.vocab else "largest item id"
        raise ValueError(
            f"model.num_items={cfg.model.num_items} is smaller than the {what} {data.num_items} "
            f"in {cfg.data.path or data.log_dir}: the item table must hold every item"
        )


def check_resources(cfg: Config) -> None:
    total = ray.cluster_resources()
    want_cpu = cfg.distributed.num_workers * cfg.distributed.cpus_per_worker
    if want_cpu > total.get("CPU", 0):
        raise UserError(
            f"distributed.num_workers={cfg.distributed.num_workers} x distributed.cpus_per_worker="
            f"{cfg.distributed.cpus_per_worker} needs {want_cpu:g} CPUs but the Ray cluster has {total.get('CPU', 0):g}"
        )
    if use_gpu(cfg) and cfg.distributed.num_workers > total.get("GPU", 0):
        raise UserError(
            f"distributed.num_workers={cfg.distributed.num_workers} with GPUs needs as many GPUs; "
            f"the Ray cluster has {total.get('GPU', 0):g}"
        )


def use_gpu(cfg: Config) -> bool:
    """distributed.use_gpu: True or False as configured; "auto" means GPUs when the cluster has one per worker."""
    if cfg.distributed.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= cfg.distributed.num_workers
    return cfg.distributed.use_gpu is True


def storage_root(cfg: Config) -> Location:
    """Ray Train's storage for this run: output.storage (a local path or a URI), else OUT/ray."""
    if cfg.output.storage:
        return storage.location(cfg.output.storage)
    return Path(cfg.output.dir).resolve() / "ray"


def run_dir(cfg: Config) -> Location:
    """The Ray Train run's directory (checkpoints, checkpoint_manager_snapshot.json): a Path, or a URI."""
    return storage.join(storage_root(cfg), RUN_NAME)


def run(cfg: Config, resume: bool = False, console: Optional[Console] = None) -> dict[str, Any]:
    """`console`: where phase lines and progress go (default: stdout, and Ray forwards the workers' output)."""
    console = console or Console()
    out = Path(cfg.output.dir).resolve()
    cfg.output.dir = str(out)  # workers run elsewhere: give them the absolute path
    if cfg.output.storage and not storage.is_uri(cfg.output.storage):
        cfg.output.storage = str(Path(cfg.output.storage).resolve())
    root, run_path = storage_root(cfg), run_dir(cfg)
    # with output.storage set, results.json and metrics.jsonl are copied there too (multi-node: the
    # storage is what outlives the driver's machine)
    mirror = root if cfg.output.storage else None
    where, new = (f"output.storage={root}", "output.storage to a new location") if mirror is not None \
        else (str(out), "output.dir to a new directory")
    if not resume and storage.exists(run_path):
        raise UserError(f"{where} holds an earlier run; pass --resume to continue it, or set {new}")
    out.mkdir(parents=True, exist_ok=True)
    metrics_log = out / "metrics.jsonl"
    if resume and mirror is not None and not metrics_log.exists():
        storage.copy_file(storage.join(mirror, "metrics.jsonl"), metrics_log)  # continue the stored log
    phases: dict[str, float] = {}
    if cfg.data.path:
        list_days(cfg.data.path)  # a missing or misnamed log directory: said before Ray starts, not after

    with console.phase("ray start", phases, "ray_start", "local instance" if not os.environ.get("RAY_ADDRESS")
                       else f"joining {os.environ['RAY_ADDRESS']}"):
        connect_ray(cfg, log_to_driver=console.verbose)

    with console.phase("data", phases, "data", cfg.data.path or "synthetic log") as note:
        # the synthetic log (when data.path is empty) is generated under out/data and reused if unchanged
        events = Count(console, "data", "event", "events read")
        try:
            data = prepare(cfg.data, out / "data", cfg.model.max_seq_len, on_events=events)
        finally:
            events.close()
        note["note"] = f"{data.num_train_users:,} training users, {data.num_eval_queries:,} evaluation queries"
        if data.vocab_summary:
            note["note"] += f", {data.vocab_summary['items']:,} items in the vocabulary"
    with user_input():  # its ValueErrors are about the config and the data
        size_item_table(cfg, data)
    if resume:
        # refuse a corrupt or incompatible checkpoint before any worker starts
        if check_resumable(run_path, cfg, data.vocab_sha256) is None:
            console.line(f"--resume: no checkpoint in {where} yet; starting from scratch")
    with console.phase("baselines", phases, "baselines"):
        reference = baselines(cfg, data)

    gpu = use_gpu(cfg)
    backend = cfg.distributed.backend if cfg.distributed.backend != "auto" else ("nccl" if gpu else "gloo")
    resources = {"CPU": cfg.distributed.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    mirrored_log = storage.join(mirror, "metrics.jsonl") if mirror is not None else None
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "data": data.to_dict(),
                           "log_dir": None if console.verbose else str(out / LOG_DIR)},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=cfg.distributed.num_workers, use_gpu=gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.distributed.placement.upper()),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(root),  # a URI goes to Ray as it is: Ray opens it with pyarrow.fs as we do
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.output.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.training.max_failures),
            callbacks=build_callbacks(cfg, out, run_path, mirrored_log),
        ),
    )
    trackers = Trackers(build_trackers(cfg, out))  # TensorBoard, MLflow: as the config asks
    progress = Progress(console, metrics_log, cfg.training.epochs, cfg.training.max_steps,
                        estimate_steps_per_epoch(data.train_sequences, cfg.model.max_seq_len,
                                                 cfg.training.batch_size, cfg.distributed.num_workers),
                        select=cfg.eval.select, on_record=trackers.record)
    console.line(f"training ... {cfg.distributed.num_workers} workers, {cfg.training.epochs} epoch(s)")
    t0 = time.perf_counter()
    result = None
    try:
        with progress:
            result = trainer.fit()
            progress.end_evaluation()
    finally:
        if mirrored_log is not None:
            storage.copy_quietly(metrics_log, mirrored_log)
        if result is None:
            trackers.close()
    phases["fit"] = time.perf_counter() - t0
    worker_results = result.return_value
    if worker_results is None:
        raise RuntimeError(f"training finished without results; see the Ray logs under {run_path}")

    results = {
        "config": cfg.to_dict(),
        "data": data.to_dict(),
        **worker_results,
        "baselines": reference,
        "phases_s": {**phases, **worker_results.get("phases_s", {})},
        # a path for local storage, a URI for URI storage
        "checkpoint": str(storage.name_of(run_path, result.checkpoint.path)) if result.checkpoint else None,
    }
    results_path = write_results(results, out, also_to=mirror)
    plot_curves(metrics_log, out / CURVES, cfg.eval.select, results)  # before finish: MLflow stores it
    try:
        trackers.finish(results, [out / CURVES, results_path])
    except Exception as e:  # the run itself succeeded and its results are written: say so, do not fail it
        console.to_log(f"tracking: {type(e).__name__}: {e}")
        console.line(f"warning: tracking could not record the results ({type(e).__name__}: {e}); they are in "
                     f"{results_path}")
    return results

