"""Saving and restoring a worker's state through Ray Train (the format: trainer/checkpoint.py).

Every rank writes what it owns into its own directory and reports it; Ray Train merges the ranks'
directories into one checkpoint in storage and registers it only once every rank has reported, so a
crash while saving leaves the previous checkpoint the latest. Loading verifies every rank's manifest first.
On CUDA, each rank's CUDA generator state is saved and restored with its CPU one.

On another world size (trainer/checkpoint.py): the table through DCP, the dense tower from dense_full.pt, the
data position by `reshard_state`, the early-stopping state and its best weights from every old rank's pieces.
The random streams cannot continue exactly when the batches change: a rank the old world had takes that rank's
generators, a new rank seeds its own from (seed, rank, step).
"""

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import ray.train
import torch

from data.loader import WindowLoader, reshard_state
from trainer.checkpoint import (
    DENSE_FULL,
    CheckpointError,
    StorageError,
    check_compatible,
    check_reshardable,
    fingerprint,
    read_meta,
    verify,
    write_manifest,
)
from trainer.config import Config
from trainer.distributed.context import DistContext
from trainer.distributed.dense import dense_digest, full_dense_state, load_full_dense_state
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
    def __init__(self, cfg: Config, ctx: DistContext, vocabulary: Optional[str] = None) -> None:
        """`vocabulary`: the sha256 of the run's item vocabulary (data.vocab.Vocabulary.digest), None for dense ids."""
        self.cfg, self.ctx, self.vocabulary = cfg, ctx, vocabulary

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
        with tempfile.TemporaryDirectory(prefix=f"ckpt-rank{self.ctx.rank}-") as tmp:
            self.write(Path(tmp), state, stack, loader)
            try:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_upload_fn=upload_fn)
            except OSError as e:  # pyarrow.fs: an endpoint down, a permission refused
                raise StorageError(f"uploading the checkpoint of step {state['step']} to {self._where()} failed "
                                   f"({_first_line(e)}); the checkpoints registered before it are intact: "
                                   "rerun with --resume once the storage is reachable") from e

    def write(self, root: Path, state: dict[str, Any], stack: Stack, loader: WindowLoader) -> None:
        """This rank's part of a checkpoint into its own directory `root` (collective). The manifest lists every
        file under `root`, so each rank needs a directory of its own; Ray Train merges them in storage."""
        table, engine = stack.table, stack.engine
        table.save(root / "table")  # collective: DCP, each rank its own shard files
        engine.save_checkpoint(str(root / "dense"), tag="dense")  # collective
        dense_full = full_dense_state(engine)  # collective
        digest = {**table.digest(), **dense_digest(dense_full)}  # collective
        (root / "loader").mkdir(exist_ok=True)
        (root / "loader" / f"rank{self.ctx.rank}.json").write_text(json.dumps(loader.state_dict()))
        (root / "trainer").mkdir(exist_ok=True)
        torch.save({**state, **cuda_rng_state(self.ctx.device)}, root / "trainer" / f"rank{self.ctx.rank}.pt")
        if self.ctx.rank == 0:
            torch.save(dense_full, root / DENSE_FULL)
            meta = {"fingerprint": fingerprint(self.cfg), "world_size": self.ctx.world_size,
                    "table_sharding": table.sharding_type, "dense_full": DENSE_FULL, "digest": digest,
                    "vocabulary": self.vocabulary,
                    "step": state["step"], "epoch": state["epoch"]}
            (root / "meta.json").write_text(json.dumps(meta, indent=1))
        write_manifest(root, self.ctx.rank)

    def load(self, checkpoint: ray.train.Checkpoint, stack: Stack, loader: WindowLoader) -> dict[str, Any]:
        """Verify, then restore the table, the dense state and the loader; returns the trainer state."""
        table, engine, rank, world = stack.table, stack.engine, self.ctx.rank, self.ctx.world_size
        with self._local(checkpoint) as root:
            meta = read_meta(root)
            saved_world = meta["world_size"]
            verify(root, saved_world)
            check_compatible(root, self.cfg, meta, self.vocabulary)
            check_reshardable(root, meta, world, table.sharding_type)
            table.load(root / "table")  # DCP reads any saved plan into this one
            if saved_world == world:
                engine.load_checkpoint(str(root / "dense"), tag="dense")
                loader.load_state_dict(json.loads((root / "loader" / f"rank{rank}.json").read_text()))
                state = torch.load(root / "trainer" / f"rank{rank}.pt", weights_only=False)
            else:
                load_full_dense_state(engine, torch.load(root / DENSE_FULL, weights_only=False))
                old = [json.loads((root / "loader" / f"rank{k}.json").read_text()) for k in range(saved_world)]
                loader.load_state_dict(reshard_state(old, world, rank, loader.stream_batches))
                state = self._resharded_state(root, saved_world, stack)
            self._check_digest(root, meta, stack)
        restore_cuda_rng(state, self.ctx.device)  # the CPU generator (torch_rng) is restored by the loop
        state["saved_world_size"] = saved_world
        if rank == 0:
            moved = f", from {saved_world} workers to {world}" if saved_world != world else ""
            print(f"resumed from {checkpoint.path} at step {state['step']} (epoch {state['epoch']}{moved})",
                  flush=True)
        return state

    def _check_digest(self, root: Path, meta: dict[str, Any], stack: Stack) -> None:
        """The loaded state against the checksums the saving world wrote (collective): a resharding that
        misplaced a row, a column block or an optimizer statistic is refused, not trained on."""
        saved = meta.get("digest")
        if saved is None:
            return  # written before digests existed
        now = {**stack.table.digest(), **dense_digest(full_dense_state(stack.engine))}
        bad = [k for k in sorted(set(saved) | set(now))
               if k not in now or k not in saved or abs(now[k] - saved[k]) > 1e-9 * max(1.0, abs(saved[k]))]
        if bad:
            raise CheckpointError(f"checkpoint {root} loaded on {self.ctx.world_size} worker(s) does not match what "
                                  f"{meta['world_size']} worker(s) saved: {', '.join(bad[:5])} differ")

    def _resharded_state(self, root: Path, saved_world: int, stack: Stack) -> dict[str, Any]:
        """This rank's trainer state in a new world: step and early stopping from rank 0, the best table
        weights re-cut to this rank's shards from every old rank's (memory-mapped) pieces, the generators as
        the module docstring says."""
        rank = self.ctx.rank
        states = [torch.load(root / "trainer" / f"rank{k}.pt", weights_only=False, mmap=True)
                  for k in range(saved_world)]
        state = dict(states[rank] if rank < saved_world else states[0])
        if rank >= saved_world:
            seed = [self.cfg.training.seed, rank, int(state["step"])]
            state["generator"] = torch.Generator().manual_seed(hash(tuple(seed)) & (2**63 - 1)).get_state()
            state["torch_rng"] = torch.Generator().manual_seed(hash(tuple(seed + [1])) & (2**63 - 1)).get_state()
            state.pop("cuda_rng", None)
        best = dict(states[0]["best"])
        if best.get("weights") is not None:
            pieces = [p for s in states for p in s["best"]["weights"]["table"]]
            best["weights"] = {"table": stack.table.cut_pieces(pieces), "dense": best["weights"]["dense"]}
        state["best"] = best
        return state
