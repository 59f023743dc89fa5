"""The checkpoint format and its checks, shared by the driver and the workers.

A checkpoint is one Ray Train checkpoint directory: table/ (the sharded table and its fused optimizer state,
torch.distributed.checkpoint), dense/ (the DeepSpeed state), dense_full.pt (rank 0: the same as full tensors,
for another world size), loader/rankR.json (each rank's data position), trainer/rankR.pt (step, generators,
early-stopping state), meta.json (rank 0: config fingerprint, world size, the table's sharding type, step,
epoch) and manifests/rankR.json (every file a rank wrote, with size and CRC-32).

It loads on another number of workers or another sharding (`--resume` with a new distributed.num_workers or
distributed.sharding): DCP reshards the table and its optimizer state, the dense tower is loaded from
dense_full.pt, and the data position is continued in global terms (data/loader.py `reshard_state`).

Workers write and read it (trainer/worker/checkpointer.py); the driver checks it before any worker starts
(`check_resumable`). The checks read a local directory or a storage URI alike, through pyarrow.fs, and name
the file or the config key that is wrong, so a corrupt, incomplete or incompatible checkpoint is refused and
never half-loaded.
"""

import json
from pathlib import Path
from typing import Any, Optional

from pyarrow.fs import LocalFileSystem

from trainer import storage
from trainer.config import Config
from trainer.errors import UserError
from trainer.storage import Location

# Settings a checkpoint's tensors depend on; any difference makes it unloadable.
COMPATIBLE_KEYS = [
    "model.num_items", "model.dim", "model.num_layers", "model.max_seq_len", "model.mixer", "model.kernel_size",
    "model.num_heads", "model.ffn_mult", "distributed.zero_stage", "distributed.precision",
]
DENSE_FULL = "dense_full.pt"
COLUMN_WISE = "column_wise"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt (a user error: trainer/errors.py)."""


class StorageError(CheckpointError):
    """The checkpoint storage could not be written or read (an endpoint down, no permission): the message
    names the location, and the checkpoints registered before are intact."""


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


def check_compatible(root: Location, cfg: Config, meta: Optional[dict[str, Any]] = None,
                     vocabulary: Optional[str] = None) -> None:
    """The config keys the tensors depend on, and the vocabulary (`vocabulary`: its sha256, None for dense ids;
    a checkpoint written before vocabularies were recorded is not checked for it)."""
    meta = meta or read_meta(root)
    saved = meta["fingerprint"]
    now = fingerprint(cfg)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {now[k]!r}" for k in COMPATIBLE_KEYS if saved.get(k) != now[k]]
    if "vocabulary" in meta and meta["vocabulary"] != vocabulary:
        def show(v: Optional[str]) -> str:
            return "dense ids" if v is None else f"sha256 {v[:12]}"
        diffs.append(f"the item vocabulary (data/vocab): checkpoint {show(meta['vocabulary'])}, "
                     f"data {show(vocabulary)}")
    if diffs:
        raise UserError(f"checkpoint {root} was written with an incompatible config ({'; '.join(diffs)})")


def check_reshardable(root: Location, meta: dict[str, Any], world_size: int, sharding: str) -> None:
    """Refuse a change of world size or sharding that cannot be loaded exactly. `sharding`: the table's sharding
    type now ('auto' on the driver, where the planner has not chosen yet). Column-wise tables keep FBGEMM's
    row-wise Adagrad statistic per column block, and their column split follows the world size."""
    saved_world, saved = meta["world_size"], meta.get("table_sharding", "auto")
    cw = COLUMN_WISE
    moved_off = saved == cw and (saved_world != world_size or sharding not in (cw, "auto"))
    if moved_off or sharding == cw and saved not in (cw, "auto"):
        raise UserError(f"checkpoint {root} holds a {saved} table of {saved_world} workers; it cannot be resumed "
                        f"as {sharding} on {world_size} (the column-wise optimizer state is per column block): "
                        f"resume with distributed.sharding={saved} distributed.num_workers={saved_world}")
    if saved_world != world_size and "dense_full" not in meta:
        raise CheckpointError(f"checkpoint {root} was written by {saved_world} workers without {DENSE_FULL}; "
                              f"resume it with distributed.num_workers={saved_world}")


def latest_checkpoint(run_dir: Location) -> Optional[Location]:
    """The checkpoint Ray Train would resume `run_dir` from (its manager's snapshot), or None.
    `run_dir`: a local directory (the answer is a Path) or a URI (the answer is a URI)."""
    text = storage.read_text(storage.join(run_dir, "checkpoint_manager_snapshot.json"))
    if text is None:
        return None
    latest = json.loads(text).get("latest_checkpoint_result")
    return storage.join(run_dir, latest["checkpoint_dir_name"]) if latest else None


def check_resumable(run_dir: Location, cfg: Config, vocabulary: Optional[str] = None) -> Optional[Location]:
    """Before any worker starts: the latest checkpoint is complete, intact and written by a compatible
    config. Raises CheckpointError or UserError (a ValueError) naming the problem; returns the checkpoint (or None)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    meta = read_meta(ckpt)
    verify(ckpt, meta["world_size"])
    check_compatible(ckpt, cfg, meta, vocabulary)
    check_reshardable(ckpt, meta, cfg.distributed.num_workers, cfg.distributed.sharding)
    return ckpt
