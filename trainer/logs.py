"""Quiet library logging so a run's own progress lines are readable. Runs in the driver and, as Ray's
worker_process_setup_hook, in every worker process (fbgemm logs each library load at INFO on the root
logger; TorchRec, DeepSpeed and Ray Data are chatty at INFO too). Warnings and errors still show."""

import logging
import warnings

import ray.data

NOISY = ("ray.data", "ray.train", "ray.tune", "deepspeed", "DeepSpeed", "torchrec", "fbgemm_gpu", "torch.distributed")


def quiet() -> None:
    logging.getLogger().setLevel(logging.WARNING)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    # TorchRec's planner warns about its default storage reservation on every plan; it is not actionable here.
    warnings.filterwarnings("ignore", message=".*HeuristicalStorageReservation.*")
    ray.data.DataContext.get_current().enable_progress_bars = False
