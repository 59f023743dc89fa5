"""Checkpoints through Ray Train: the sharded table (DCP), the DeepSpeed state, the loader position.

Every rank writes what it owns into its own directory and reports it; Ray Train merges the ranks'
directories into one checkpoint in storage and registers it only once every rank has reported, so a
crash while saving leaves the previous checkpoint the latest. Each rank also writes a manifest of its
files (size, CRC-32); loading verifies every manifest first, so a corrupt or incomplete checkpoint is
reported by file name and never half-loaded. The driver-side checks (`latest_checkpoint`, `check_resumable`,
`verify`, `check_compatible`) read a local directory or a storage URI alike, through pyarrow.fs.
"""

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import ray.train
import torch
from pyarrow.fs import LocalFileSystem

from trainer import storage
from trainer.config import Config
from trainer.storage import Location

# Settings a checkpoint's tensors depend on; any difference makes it unloadable.
COMPATIBLE_KEYS = [
    "model.num_items", "model.dim", "model.num_layers", "model.max_seq_len", "model.mixer", "model.kernel_size",
    "model.num_heads", "model.ffn_mult", "distributed.num_workers", "distributed.zero_stage",
    "distributed.precision", "distributed.sharding",
]


class CheckpointError(RuntimeError):
    pass


def _crc32(path: Path) -> int:
    return storage.crc32(LocalFileSystem(), str(path))


def _lookup(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def fingerprint(cfg: Config) -> dict[str, Any]:
    return {key: _lookup(cfg, key) for key in COMPATIBLE_KEYS}


def write_manifest(root: Path, rank: int) -> None:
    files = {
        str(p.relative_to(root)): {"bytes": p.stat().st_size, "crc32": _crc32(p)}
        for p in sorted(root.rglob("*")) if p.is_file()
    }
    manifest = root / "manifests" / f"rank{rank}.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(files, indent=1))


def verify(root: Location, world_size: int) -> None:
    """Raise CheckpointError unless every rank's manifest is present and every file matches it.
    `root`: a local directory or a URI (read through pyarrow.fs; one listing, then CRC-32 over streams)."""
    fs, base = storage.resolve(root)
    files = storage.list_files(fs, base)
    for rank in range(world_size):
        manifest = f"manifests/rank{rank}.json"
        if manifest not in files:
            raise CheckpointError(f"checkpoint {root} is incomplete: rank{rank}.json from rank {rank} is missing")
        for rel, want in json.loads(storage.read_bytes(fs, f"{base}/{manifest}")).items():
            info = files.get(rel)
            if info is None:
                raise CheckpointError(f"checkpoint {root} is incomplete: {rel} (rank {rank}) is missing")
            if info.size != want["bytes"] or storage.crc32(fs, info.path) != want["crc32"]:
                raise CheckpointError(f"checkpoint {root} is corrupt: {rel} (rank {rank}) does not match its manifest")


def read_meta(root: Location) -> dict[str, Any]:
    """A checkpoint's meta.json (written by rank 0: fingerprint, world size, step, epoch)."""
    text = storage.read_text(storage.join(root, "meta.json"))
    if text is None:
        raise CheckpointError(f"checkpoint {root} is incomplete: meta.json from rank 0 is missing")
    return json.loads(text)


def check_compatible(root: Location, cfg: Config, meta: Optional[dict[str, Any]] = None) -> None:
    saved = (meta or read_meta(root))["fingerprint"]
    now = fingerprint(cfg)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {now[k]!r}" for k in COMPATIBLE_KEYS if saved.get(k) != now[k]]
    if diffs:
        raise ValueError(f"checkpoint {root} was written with an incompatible config ({'; '.join(diffs)})")


def latest_checkpoint(run_dir: Location) -> Optional[Location]:
    """The checkpoint Ray Train would resume `run_dir` from (its manager's snapshot), or None.
    `run_dir`: a local directory (the answer is a Path) or a URI (the answer is a URI)."""
    text = storage.read_text(storage.join(run_dir, "checkpoint_manager_snapshot.json"))
    if text is None:
        return None
    latest = json.loads(text).get("latest_checkpoint_result")
    return storage.join(run_dir, latest["checkpoint_dir_name"]) if latest else None


def check_resumable(run_dir: Location, cfg: Config) -> Optional[Location]:
    """Before any worker starts: the latest checkpoint is complete, intact and written by a compatible
    config. Raises CheckpointError or ValueError naming the problem; returns the checkpoint (or None)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    meta = read_meta(ckpt)
    verify(ckpt, meta["world_size"])
    check_compatible(ckpt, cfg, meta)
    return ckpt


class Checkpointer:
    def __init__(self, cfg: Config, ctx) -> None:
        self.cfg, self.ctx = cfg, ctx

    def save(self, state: dict[str, Any], table, engine, loader, metrics: dict[str, Any], die: bool = False) -> None:
        """Write this rank's part and report it. `die`: fault injection, SIGKILL halfway through the upload."""
        with tempfile.TemporaryDirectory(prefix=f"ckpt-rank{self.ctx.rank}-") as tmp:
            root = Path(tmp)
            table.save(root / "table")  # collective: DCP, each rank its own shard files
            engine.save_checkpoint(str(root / "dense"), tag="dense")  # collective
            (root / "loader").mkdir()
            (root / "loader" / f"rank{self.ctx.rank}.json").write_text(json.dumps(loader.state_dict()))
            (root / "trainer").mkdir()
            torch.save(state, root / "trainer" / f"rank{self.ctx.rank}.pt")
            if self.ctx.rank == 0:
                meta = {"fingerprint": fingerprint(self.cfg), "world_size": self.ctx.world_size,
                        "step": state["step"], "epoch": state["epoch"]}
                (root / "meta.json").write_text(json.dumps(meta, indent=1))
            write_manifest(root, self.ctx.rank)
            upload = _upload_half_then_die if die else None
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_upload_fn=upload)

    def load(self, checkpoint: "ray.train.Checkpoint", table, engine, loader) -> dict[str, Any]:
        with checkpoint.as_directory() as tmp:
            root = Path(tmp)
            verify(root, self.ctx.world_size)
            check_compatible(root, self.cfg)
            table.load(root / "table")
            engine.load_checkpoint(str(root / "dense"), tag="dense")
            loader.load_state_dict(json.loads((root / "loader" / f"rank{self.ctx.rank}.json").read_text()))
            state = torch.load(root / "trainer" / f"rank{self.ctx.rank}.pt", weights_only=False)
        if self.ctx.rank == 0:
            print(f"resumed from {checkpoint.path} at step {state['step']} (epoch {state['epoch']})", flush=True)
        return state


def _upload_half_then_die(checkpoint: "ray.train.Checkpoint", dir_name: str) -> "ray.train.Checkpoint":
    """Fault injection: copy half of this rank's files into the checkpoint's storage directory (as Ray's
    own upload would), then SIGKILL this process: a crash in the middle of writing a checkpoint."""
    import os
    import signal
    import time

    import pyarrow.fs

    # Ray's controller polls reports every 2 s: let the previous checkpoint's registration land first.
    time.sleep(5)
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
