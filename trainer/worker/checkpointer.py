"""Saving and restoring a worker's state through Ray Train (the format: trainer/checkpoint.py).

Every rank writes what it owns into its own directory and reports it; Ray Train merges the ranks'
directories into one checkpoint in storage and registers it only once every rank has reported, so a
crash while saving leaves the previous checkpoint the latest. Loading verifies every rank's manifest first.
On CUDA, each rank's CUDA generator state is saved and restored with its CPU one.
"""

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import ray.train
import torch

from data.loader import WindowLoader
from trainer.checkpoint import StorageError, check_compatible, fingerprint, verify, write_manifest
from trainer.config import Config
from trainer.distributed.context import DistContext
from trainer.worker.faults import UploadFn
from trainer.worker.stack import Stack


def cuda_rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's CUDA generator state when it computes on CUDA (dropout masks on the device draw from it,
    not from the CPU generator saved as torch_rng), else nothing: a resumed GPU run continues exactly."""
    if device.type != "cuda":
        return {}
    return {"cuda_rng": torch.cuda.get_rng_state(device)}


def restore_cuda_rng(state: dict[str, Any], device: torch.device) -> None:
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class Checkpointer:
    def __init__(self, cfg: Config, ctx: DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx

    def _where(self) -> str:
        return self.cfg.output.storage or f"{self.cfg.output.dir}/ray"

    @contextmanager
    def _local(self, checkpoint: ray.train.Checkpoint) -> Iterator[Path]:
        """The checkpoint as a local directory (Ray downloads one that is not on a local filesystem)."""
        local = checkpoint.as_directory()
        try:
            tmp = local.__enter__()
        except OSError as e:  # pyarrow.fs: the storage cannot be reached
            raise StorageError(f"reading checkpoint {checkpoint.path} from {self._where()} failed "
                               f"({_first_line(e)})") from e
        try:
            yield Path(tmp)
        finally:
            local.__exit__(None, None, None)

    def save(self, state: dict[str, Any], stack: Stack, loader: WindowLoader, metrics: dict[str, Any],
             upload_fn: Optional[UploadFn] = None) -> None:
        """Write this rank's part and report it (collective). `upload_fn`: Ray's upload when None."""
        table, engine = stack.table, stack.engine
        with tempfile.TemporaryDirectory(prefix=f"ckpt-rank{self.ctx.rank}-") as tmp:
            root = Path(tmp)
            table.save(root / "table")  # collective: DCP, each rank its own shard files
            engine.save_checkpoint(str(root / "dense"), tag="dense")  # collective
            (root / "loader").mkdir()
            (root / "loader" / f"rank{self.ctx.rank}.json").write_text(json.dumps(loader.state_dict()))
            (root / "trainer").mkdir()
            torch.save({**state, **cuda_rng_state(self.ctx.device)}, root / "trainer" / f"rank{self.ctx.rank}.pt")
            if self.ctx.rank == 0:
                meta = {"fingerprint": fingerprint(self.cfg), "world_size": self.ctx.world_size,
                        "step": state["step"], "epoch": state["epoch"]}
                (root / "meta.json").write_text(json.dumps(meta, indent=1))
            write_manifest(root, self.ctx.rank)
            try:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_upload_fn=upload_fn)
            except OSError as e:  # pyarrow.fs: an endpoint down, a permission refused
                raise StorageError(f"uploading the checkpoint of step {state['step']} to {self._where()} failed "
                                   f"({_first_line(e)}); the checkpoints registered before it are intact: "
                                   "rerun with --resume once the storage is reachable") from e

    def load(self, checkpoint: ray.train.Checkpoint, stack: Stack, loader: WindowLoader) -> dict[str, Any]:
        """Verify, then restore the table, the dense state and the loader; returns the trainer state."""
        table, engine = stack.table, stack.engine
        with self._local(checkpoint) as root:
            verify(root, self.ctx.world_size)
            check_compatible(root, self.cfg)
            table.load(root / "table")
            engine.load_checkpoint(str(root / "dense"), tag="dense")
            loader.load_state_dict(json.loads((root / "loader" / f"rank{self.ctx.rank}.json").read_text()))
            state = torch.load(root / "trainer" / f"rank{self.ctx.rank}.pt", weights_only=False)
        restore_cuda_rng(state, self.ctx.device)  # the CPU generator (torch_rng) is restored by the loop
        if self.ctx.rank == 0:
            print(f"resumed from {checkpoint.path} at step {state['step']} (epoch {state['epoch']})", flush=True)
        return state
