"""Shared test helpers: small configs, tiny hand-made logs, and N-process gloo groups.

    results = run_distributed(fn, 2, arg1, arg2)  # fn(rank, world_size, arg1, arg2) -> picklable

`run_distributed` runs `fn` (an importable, module-level function) in N fresh processes joined in a gloo
group (CPU) and returns each rank's result; a failure in any rank raises here with the child's traceback.
Children come from a forkserver that imported torch, TorchRec and DeepSpeed once per test session (about 10 s
per process saved); the forkserver itself never runs torch ops, so no thread-pool state is forked.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing.forkserver
import os
import pickle
import socket
import struct
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from data.schema import TS_TYPE, DayLike, PathLike, SkipReport, day_dir, iter_file, list_files
from model.config import LossConfig, ModelConfig
from model.losses import NegativeSampler, loss_from_embeddings, sample_loss_ids
from trainer.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- configs

# A small trainer run on the smoke config: a synthetic log of 300 users and 200 items, 2 workers (about a
# minute on 2 cores).
SMALL = [
    "data.synth.users=300", "data.synth.items=200", "data.synth.days=4", "data.synth.events_per_user=60",
    "data.backend=arrow", "model.dim=16", "model.max_seq_len=20", "model.kernel_size=20",
    "training.batch_size=32", "training.epochs=2", "training.log_every=5", "training.loss.num_negatives=32",
    "eval.ks=[1,10,50]", "distributed.num_workers=2",
]


def small_run_config(out: Path, *overrides: str) -> Config:
    return load_config(ROOT / "configs" / "smoke.yaml", [*SMALL, f"output.dir={out}", *overrides])


# A one-block stack for the 2-process tests; 50 rows, so row-wise shards are equal (25 + 25).
NUM_ITEMS = 49
DIM = 16
SEQ = 6


def small_stack_config(sharding: str = "row_wise", zero: int = 0, precision: str = "fp32", batch: int = 4,
                       **training: Any) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(num_items=NUM_ITEMS, dim=DIM, num_layers=1, max_seq_len=SEQ, mixer="dwc",
                            kernel_size=3, dropout=0.0, init_std=0.1)
    cfg.distributed.sharding = sharding  # type: ignore[assignment]
    cfg.distributed.zero_stage = zero
    cfg.distributed.precision = precision  # type: ignore[assignment]
    cfg.training.batch_size = batch
    cfg.training.seed = 3
    for key, value in training.items():
        setattr(cfg.training, key, value)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- tiny logs

def ts(text: str) -> int:
    """'2026-01-02 00:00:05' (UTC) -> microseconds since the epoch."""
    t = dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp()) * 1_000_000 + t.microsecond


def events_table(rows: Iterable[tuple], extra: Optional[dict] = None) -> pa.Table:
    """(user_id, item_id, 'YYYY-MM-DD HH:MM:SS') rows -> a table of the log schema."""
    rows = list(rows)
    cols = {
        "user_id": pa.array([r[0] for r in rows], pa.int64()),
        "item_id": pa.array([r[1] for r in rows], pa.int64()),
        "ts": pa.array([ts(r[2]) for r in rows], pa.int64()).cast(TS_TYPE),
    }
    cols.update(extra or {})
    return pa.table(cols)


def write_log(log_dir: PathLike, rows: Iterable[tuple], part: str = "part-00000.parquet") -> str:
    """Write events into day partitions by the date of their timestamp; returns log_dir."""
    by_day: dict = {}
    for r in rows:
        by_day.setdefault(r[2][:10], []).append(r)
    for day, day_rows in by_day.items():
        path = day_dir(log_dir, day)
        os.makedirs(path, exist_ok=True)
        pq.write_table(events_table(day_rows), os.path.join(path, part))
    return os.fspath(log_dir)


def iter_log(log_dir: PathLike, start_day: Optional[DayLike] = None, end_day: Optional[DayLike] = None,
             **kwargs: Any) -> Iterable[pa.Table]:
    """The valid rows of days in [start_day, end_day), file by file (kwargs: iter_file's)."""
    kwargs.setdefault("report", SkipReport())
    kwargs.setdefault("max_bad_fraction", 0.001)
    for f in list_files(log_dir, start_day, end_day):
        yield from iter_file(f, **kwargs)


# ---------------------------------------------------------------- single-process losses


def next_item_loss(cfg: LossConfig, hidden: torch.Tensor, targets: torch.Tensor,
                   embed: Callable[[torch.Tensor], torch.Tensor], sampler: NegativeSampler, positions: str = "all",
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The trainer's loss with any `embed` (e.g. an nn.Embedding): hidden (B, L, D), targets (B, L).
    One lookup, even for a batch without targets."""
    ids = sample_loss_ids(cfg, targets, sampler, positions, generator)
    return loss_from_embeddings(cfg, hidden, ids, embed(ids.all), sampler)


# ---------------------------------------------------------------- N-process gloo groups

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        with open(path, "wb") as f:
            pickle.dump(("ok", result), f)
    except BaseException:
        with open(path, "wb") as f:
            pickle.dump(("error", traceback.format_exc()), f)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


PRELOAD = ["torch", "torch.distributed", "fbgemm_gpu", "torchrec", "torchrec.distributed", "deepspeed"]


def _context() -> Any:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the forkserver inherits the environment
    mp_ctx = mp.get_context("forkserver")
    mp_ctx.set_forkserver_preload(PRELOAD)
    return mp_ctx


def start_forkserver() -> None:
    """Start the forkserver now; its imports (PRELOAD: seconds) then overlap whatever runs before the first
    distributed test instead of delaying it."""
    _context()
    multiprocessing.forkserver.ensure_running()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """fn(rank, world_size, *args) in `world_size` processes; returns the per-rank results."""
    _context()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_child, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size,
                                 join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=2.0):
                if time.monotonic() > deadline:
                    for proc in ctx.processes:
                        proc.kill()
                    raise TimeoutError(f"distributed run exceeded {timeout:.0f} s")
        except Exception as e:
            errors = []
            for rank in range(world_size):
                path = os.path.join(out_dir, f"rank{rank}.pkl")
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        status, payload = pickle.load(f)
                    if status == "error":
                        errors.append(f"--- rank {rank} ---\n{payload}")
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors or [str(e)])) from None
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                status, payload = pickle.load(f)
            assert status == "ok", payload
            results.append(payload)
        return results


# ---------------------------------------------------------------- tracking records (console and tracker tests)


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under `tb_dir`: tag -> [(step, value)], by parsing the TFRecord
    framing (length u64, crc u32, Event bytes, crc u32) with tensorboardX's own protobufs."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


RECORDS = [
    {"time": 1.0, "step": 5, "epoch": 0, "loss": 5.0, "events_per_s": 1000.0, "lr/dense": 1e-4, "lr/sparse": 0.05},
    {"time": 2.0, "step": 10, "epoch": 0, "loss": 4.5, "events_per_s": 1100.0, "lr/dense": 5e-4, "lr/sparse": 0.05},
    {"time": 3.0, "step": 10, "epoch": 1, "checkpoint": "/x/checkpoint_1"},
    {"time": 3.5, "step": 10, "epoch": 1, "valid/ndcg@10": 0.25, "valid/hr@10": 0.5},
    {"time": 4.0, "step": 15, "epoch": 1, "loss": 4.0, "events_per_s": 1200.0, "lr/dense": 1e-3, "lr/sparse": 0.04},
    {"time": 5.0, "step": 20, "epoch": 2, "checkpoint": "/x/checkpoint_2"},
    {"time": 5.5, "step": 20, "epoch": 2, "valid/ndcg@10": 0.3, "valid/hr@10": 0.55},
    {"time": 6.0, "step": 20, "epoch": 2, "phase": "evaluation"},
]
RESULTS = {"metrics": {"hr@10": 0.6, "ndcg@10": 0.31}, "throughput": {"steps": 20, "events_per_s": 1150.0},
           "baselines": {"popularity": {"hr@10": 0.3, "ndcg@10": 0.15, "eval_day": "2026-01-04"}}}
