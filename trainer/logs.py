"""Quiet library logging so a run's own progress lines are readable. Runs in the driver and, as Ray's
worker_process_setup_hook, in every worker process (fbgemm logs each library load at INFO on the root
logger; TorchRec, DeepSpeed and Ray Data are chatty at INFO too). Warnings and errors still show."""

import logging
import os
import sys
import warnings
from pathlib import Path

import ray.data

NOISY = ("ray.data", "ray.train", "ray.tune", "deepspeed", "DeepSpeed", "torchrec", "fbgemm_gpu", "torch.distributed")


def quiet() -> None:
    logging.getLogger().setLevel(logging.WARNING)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    # TorchRec's planner warns about its default storage reservation on every plan; it is not actionable here.
    warnings.filterwarnings("ignore", message=".*HeuristicalStorageReservation.*")
    ray.data.DataContext.get_current().enable_progress_bars = False


def to_file(path: Path) -> None:
    """Point this process's stdout and stderr (file descriptors 1 and 2: Python, C++ and child processes
    alike) at `path`, appending. Says so first where the output went until now (e.g. Ray's worker log)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    print(f"output continues in {path}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
