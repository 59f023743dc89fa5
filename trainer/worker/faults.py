"""Fault injection for the reliability tests, from the config's `debug` section (off by default).

The worker loop calls the injector at named points; the training step itself knows nothing of it.
- `before_step(step)`: SIGKILL this rank before step N (debug.kill_at_step, debug.kill_rank), or make the
  dense tower's output (hence the loss) NaN for step N (debug.nan_at_step, every rank);
- `checkpoint_upload(step)`: the upload function for step N's checkpoint that copies half of this rank's
  files and then SIGKILLs the process (debug.kill_in_save): a crash in the middle of writing a checkpoint.
Kills happen only in a run that Ray Train has not restarted yet, so the recovery then runs to the end.
"""

import os
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import pyarrow.fs
import ray.train
from torch import nn

from trainer.config import DebugConfig

# Ray's controller polls reports every 2 s; a worker dying sooner after reporting a checkpoint can lose its
# registration (Ray then restores the one before). Waiting this long keeps the tests exact.
REGISTRATION_WAIT_S = 5.0

UploadFn = Callable[["ray.train.Checkpoint", str], "ray.train.Checkpoint"]


class FaultInjector:
    def __init__(self, cfg: DebugConfig, rank: int, restarted: bool) -> None:
        self.cfg, self.rank, self.restarted = cfg, rank, restarted

    def _kills(self, step: int, in_save: bool) -> bool:
        c = self.cfg
        return (c.kill_at_step == step and c.kill_in_save == in_save and self.rank == c.kill_rank
                and not self.restarted)

    def before_step(self, step: int, module: nn.Module) -> None:
        """Called before optimizer step `step` (1-based) with the dense tower."""
        if self._kills(step, in_save=False):
            time.sleep(REGISTRATION_WAIT_S)
            print(f"fault injection: killing rank {self.rank} (pid {os.getpid()}) before step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.cfg.nan_at_step == step:
            _poison_next_forward(module)

    def checkpoint_upload(self, step: int) -> Optional[UploadFn]:
        """The upload function for the checkpoint of `step`: None for Ray's own."""
        return _upload_half_then_die if self._kills(step, in_save=True) else None


def _poison_next_forward(module: nn.Module) -> None:
    """The module's next output is NaN (a one-shot forward hook)."""
    def hook(_module, _inputs, output):
        handle.remove()
        return output * float("nan")

    handle = module.register_forward_hook(hook)


def _upload_half_then_die(checkpoint: "ray.train.Checkpoint", dir_name: str) -> "ray.train.Checkpoint":
    """Copy half of this rank's files into the checkpoint's storage directory (as Ray's own upload would),
    then SIGKILL this process."""
    time.sleep(REGISTRATION_WAIT_S)  # let the previous checkpoint's registration land first
    storage = ray.train.get_context().get_storage()
    dest = storage.build_checkpoint_path_from_name(dir_name)
    files = sorted(p for p in Path(checkpoint.path).rglob("*") if p.is_file())
    for f in files[: len(files) // 2]:
        target = f"{dest}/{f.relative_to(checkpoint.path).as_posix()}"
        storage.storage_filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pyarrow.fs.copy_files(str(f), target, destination_filesystem=storage.storage_filesystem)
    print(f"fault injection: killing pid {os.getpid()} after uploading {len(files) // 2} of {len(files)} files "
          f"of {dir_name}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")
