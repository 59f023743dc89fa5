"""DeepSpeed over the dense tower only.

`wrap_dense` hands DeepSpeed the dense tower ONLY: the TorchRec table must never be inside a DeepSpeed
engine (at initialisation DeepSpeed broadcasts rank 0's parameters, which would overwrite every other rank's
embedding shard; tests/test_parallel.py shows the trap). The step that uses it is `trainer.worker.stack`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer.config import Config
from trainer.distributed.context import DistContext

if TYPE_CHECKING:  # deepspeed is imported only where an engine is built: the driver never loads it
    from deepspeed import DeepSpeedEngine


SHM_OP = "deepspeed_shm_comm"


def select_accelerator(ctx: DistContext) -> None:
    """DS_ACCELERATOR for this process, from its device, before DeepSpeed is imported (it reads the variable
    at import). An empty value makes that import raise; `cpu` on a GPU worker moves the tower to the CPU."""
    os.environ["DS_ACCELERATOR"] = "cuda" if ctx.device.type == "cuda" else "cpu"


def init_deepspeed_comm(ctx: DistContext) -> None:
    """Attach DeepSpeed's comm layer to the existing process group, without any JIT build.

    deepspeed 0.19.8 builds a shared-memory all-reduce op (a C++ JIT build, ~50 s the first
    time) whenever it creates its TorchBackend, even over an existing group. That op serves only
    `inference_all_reduce`, which training never calls, so we mark it incompatible first:
    `deepspeed.ops.__compatible_ops__` is probed once and cached in the module, so the edit holds.
    """
    select_accelerator(ctx)
    import deepspeed.comm as ds_dist
    import deepspeed.ops as ds_ops

    ds_ops.__compatible_ops__[SHM_OP] = False
    ds_dist.init_distributed(dist_backend=ctx.backend, auto_mpi_discovery=False, verbose=False,
                             dist_init_required=False)


def deepspeed_config(cfg: Config, ctx: DistContext) -> dict[str, Any]:
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


def wrap_dense(encoder: nn.Module, cfg: Config, ctx: DistContext) -> "DeepSpeedEngine":
    """DeepSpeed over the dense tower only, with a torch AdamW client optimizer.

    Torch AdamW (not DeepSpeed's FusedAdam/CPUAdam) avoids their JIT builds. Under bf16 the
    engine casts the module to bf16: callers cast the (fp32) TorchRec embeddings to
    `engine_dtype(engine)` at the boundary and compute losses in fp32.
    """
    select_accelerator(ctx)
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
