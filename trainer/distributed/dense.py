"""DeepSpeed over the dense tower only.

`wrap_dense` hands DeepSpeed the dense tower ONLY: the TorchRec table must never be inside a DeepSpeed
engine (at initialisation DeepSpeed broadcasts rank 0's parameters, which would overwrite every other rank's
embedding shard; tests/test_parallel.py shows the trap). The step that uses it is `trainer.worker.stack`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import Config
from trainer.distributed.collectives import shard_digest
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


# ---------------------------------------------------------------- world-size-free state
# DeepSpeed's own checkpoint of ZeRO 1/2 (and of its bf16 optimizer) holds each data-parallel rank's partition
# of the fp32 master weights and optimizer state, and refuses another world size. This state is full tensors
# per parameter name: any world size, ZeRO stage 0-2 and precision can load it.


def _master(engine: "DeepSpeedEngine", p: nn.Parameter) -> tuple[Optional[torch.Tensor], Optional[tuple]]:
    """(the flat fp32 partition holding part of `p`, (its offset there, offset in p, numel)), (None, None)
    when this rank holds none of it, or (p, None) when the optimizer steps `p` itself (no partitioning)."""
    if hasattr(p, "_hp_mapping"):  # ZeRO 1/2 or the bf16 optimizer: fragments of flat fp32 partitions
        m = p._hp_mapping
        if m is None:
            return None, None
        flat = engine.basic_optimizer.param_groups[m.param_group_index]["params"][0]
        return flat, (m.hp_fragment_address.start, m.lp_fragment_address.start, m.hp_fragment_address.numel)
    if any(p is q for g in engine.basic_optimizer.param_groups for q in g["params"]):
        return p, None
    opt = engine.optimizer  # bf16 without ZeRO: whole fp32 copies beside the module's bf16 parameters
    for low, high in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
        for q, master in zip(low, high):
            if p is q:
                return master, None
    raise NotImplementedError(f"cannot locate the fp32 master of a parameter under {type(engine.optimizer).__name__}")


def _gather(p: nn.Parameter, flat: Optional[torch.Tensor], where: Optional[tuple], source: Optional[torch.Tensor],
            group: Any) -> torch.Tensor:
    """The full fp32 tensor of `p`'s shape from each rank's fragment of `source` (collective when partitioned)."""
    if where is None and flat is not None:  # not partitioned: every rank holds the whole tensor
        return source.detach().float().clone().view_as(p)
    out = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    if where is not None:
        hp0, lp0, n = where
        out.narrow(0, lp0, n).copy_(source.narrow(0, hp0, n))
    dist.all_reduce(out, group=group)
    return out.view_as(p)


def full_dense_state(engine: "DeepSpeedEngine") -> dict[str, Any]:
    """Collective. {"params": {name: fp32 master}, "moments": {name: {key: fp32}}, "step": optimizer steps}."""
    state = engine.basic_optimizer.state
    group = engine.optimizer.dp_process_group if hasattr(engine.optimizer, "dp_process_group") else None
    named = list(engine.module.named_parameters())
    located = [_master(engine, p) for _, p in named]
    # optimizer-state keys and step, from any partition this rank holds (every rank holds one)
    flats = [f for f, _ in located if f is not None and state.get(f)]
    keys = sorted(k for k, v in state[flats[0]].items() if torch.is_tensor(v) and v.numel() > 1) if flats else []
    step = float(state[flats[0]]["step"]) if flats else 0.0
    params, moments = {}, {}
    for (name, p), (flat, where) in zip(named, located):
        params[name] = _gather(p, flat, where, flat, group)
        moments[name] = {k: _gather(p, flat, where, None if flat is None else state[flat][k], group) for k in keys}
    return {"params": params, "moments": moments, "step": step}


@torch.no_grad()
def load_full_dense_state(engine: "DeepSpeedEngine", saved: dict[str, Any]) -> None:
    """Write a `full_dense_state` into this engine's module, fp32 masters and optimizer state, whatever its
    world size and partitioning. The optimizer state of torch AdamW is created here when it does not exist yet
    (torch creates it lazily at the first step, and then never again)."""
    state = engine.basic_optimizer.state
    keys = sorted({k for m in saved["moments"].values() for k in m})
    for name, p in engine.module.named_parameters():
        if name not in saved["params"]:
            raise KeyError(f"the saved dense state has no parameter {name!r}")
        value = saved["params"][name].to(p.device)
        p.copy_(value.to(p.dtype))  # the module's (possibly bf16) copy
        flat, where = _master(engine, p)
        if flat is None:
            continue
        if keys and not state.get(flat):
            state[flat] = {"step": torch.tensor(saved["step"]), **{k: torch.zeros_like(flat) for k in keys}}
        targets = [(flat, value)] + [(state[flat][k], saved["moments"][name][k].to(p.device)) for k in keys]
        for dst, src in targets:
            if where is None:
                dst.copy_(src.view_as(dst))
            else:
                hp0, lp0, n = where
                dst.narrow(0, hp0, n).copy_(src.flatten().narrow(0, lp0, n))
        if keys:
            state[flat]["step"] = torch.tensor(saved["step"])


def dense_digest(full: dict[str, Any]) -> dict[str, float]:
    """Checksums of a `full_dense_state` (every rank holds it whole: no collective)."""
    out = {}
    for name, value in full["params"].items():
        out[f"dense/{name}"] = shard_digest((0,) * value.dim(), tuple(value.shape), value)
        for key, moment in full["moments"][name].items():
            out[f"dense/{name}/{key}"] = shard_digest((0,) * moment.dim(), tuple(moment.shape), moment)
    return out
