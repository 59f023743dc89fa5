"""Run a function in N fresh processes joined in a gloo group (CPU), and collect its results.

    results = run_distributed(fn, 2, arg1, arg2)  # fn(rank, world_size, arg1, arg2) -> picklable

`fn` must be importable (a module-level function). A failure in any rank raises here with the
child's traceback. Children come from a forkserver that imported torch, TorchRec and DeepSpeed
once per test session (about 10 s per process saved); the forkserver itself never runs torch
ops, so no thread-pool state is forked.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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
