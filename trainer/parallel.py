"""Distributed context and the DeepSpeed wrapper for the dense tower.

The process group always comes from outside (Ray Train in production, a gloo group in
tests); nothing here creates one. `DistContext` is the one object that knows world size,
ranks and device. `wrap_dense` hands DeepSpeed the dense tower ONLY: the TorchRec table must
never be inside a DeepSpeed engine (at initialisation DeepSpeed broadcasts rank 0's
parameters, which would overwrite every other rank's embedding shard; see tests/test_parallel.py).

A training step, in this order:
    emb = table.lookup(ids)                       # (B, L, D) fp32, all-to-all inside TorchRec
    hidden = engine(emb.to(engine_dtype), valid)  # dense tower under DeepSpeed
    loss = next_item_loss(..., embed=table.lookup) computed in fp32
    engine.backward(loss)   # backprops into the TorchRec outputs: the fused sparse optimizer
                            # updates the table rows during this call
    engine.step()           # dense AdamW step (+ ZeRO gradient reduction / clipping)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:  # deepspeed is heavy to import; only the wrapper needs it
    from deepspeed import DeepSpeedEngine

    from trainer.config import Config


@dataclass(frozen=True)
class DistContext:
    """World size, ranks and device of this worker, read from an initialised process group."""

    world_size: int
    rank: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str  # "gloo" or "nccl"

    @classmethod
    def from_process_group(
        cls, local_rank: Optional[int] = None, local_world_size: Optional[int] = None
    ) -> "DistContext":
        """Build from the default process group; local ranks default to LOCAL_RANK/LOCAL_WORLD_SIZE.

        nccl means one CUDA device per local rank; gloo means CPU. Checks that every rank
        agrees on backend and device type (one collective).
        """
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; Ray Train (or the test) must create the group")
        world_size, rank = dist.get_world_size(), dist.get_rank()
        backend = str(dist.get_backend())
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if local_world_size is None:
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise RuntimeError("process group backend is nccl but CUDA is not available")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        elif backend == "gloo":
            device = torch.device("cpu")
        else:
            raise RuntimeError(f"unsupported process group backend {backend!r}; expected gloo or nccl")
        ctx = cls(world_size, rank, local_rank, local_world_size, device, backend)
        ctx.check()
        return ctx

    def check(self) -> None:
        """Internal invariants, then agreement across ranks (catches a worker that found no GPU)."""
        assert 0 <= self.rank < self.world_size, (self.rank, self.world_size)
        assert 0 <= self.local_rank < self.local_world_size <= self.world_size, self
        assert self.world_size == dist.get_world_size() and self.rank == dist.get_rank()
        mine = (self.backend, self.device.type, self.world_size)
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        if any(other != mine for other in everyone):
            raise RuntimeError(f"ranks disagree on (backend, device type, world size): {everyone}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------- DeepSpeed

SHM_OP = "deepspeed_shm_comm"


def init_deepspeed_comm(ctx: DistContext) -> None:
    """Attach DeepSpeed's comm layer to the existing process group, without any JIT build.

    deepspeed 0.19.8 builds a shared-memory all-reduce op (a C++ JIT build, ~50 s the first
    time) whenever it creates its TorchBackend, even over an existing group. That op serves only
    `inference_all_reduce`, which training never calls, so we mark it incompatible first:
    `deepspeed.ops.__compatible_ops__` is probed once and cached in the module, so the edit holds.
    """
    import deepspeed.comm as ds_dist
    import deepspeed.ops as ds_ops

    ds_ops.__compatible_ops__[SHM_OP] = False
    ds_dist.init_distributed(dist_backend=ctx.backend, auto_mpi_discovery=False, verbose=False,
                             dist_init_required=False)


def deepspeed_config(cfg: "Config", ctx: DistContext) -> dict[str, Any]:
    """The DeepSpeed JSON config for the dense tower, from our config tree."""
    d, t = cfg.distributed, cfg.training
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": t.batch_size * ctx.world_size,
        "gradient_clipping": t.grad_clip,  # 0 disables
        "zero_optimization": {"stage": d.zero_stage},
        "bf16": {"enabled": d.precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def wrap_dense(encoder: nn.Module, cfg: "Config", ctx: DistContext) -> "DeepSpeedEngine":
    """DeepSpeed over the dense tower only, with a torch AdamW client optimizer.

    Torch AdamW (not DeepSpeed's FusedAdam/CPUAdam) avoids their JIT builds. Under bf16 the
    engine casts the module to bf16: callers cast the (fp32) TorchRec embeddings to
    `engine_dtype(engine)` at the boundary and compute losses in fp32.
    """
    import deepspeed

    if any(_is_torchrec_module(m) for m in encoder.modules()):
        raise ValueError("wrap_dense got a module containing a TorchRec sharded table; "
                         "DeepSpeed must wrap the dense tower only")
    if cfg.distributed.activation_checkpointing:
        if not hasattr(encoder, "checkpoint_blocks"):
            raise ValueError("distributed.activation_checkpointing needs an encoder with `checkpoint_blocks`")
        encoder.checkpoint_blocks = True
    init_deepspeed_comm(ctx)
    encoder.to(ctx.device)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.training.lr, weight_decay=cfg.training.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=encoder, optimizer=optimizer, config=deepspeed_config(cfg, ctx), dist_init_required=False
    )
    return engine


def engine_dtype(engine: "DeepSpeedEngine") -> torch.dtype:
    """The dtype the engine's module computes in (bf16 when enabled)."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def _is_torchrec_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torchrec.")
