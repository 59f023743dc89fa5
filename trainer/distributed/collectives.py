"""Collectives shared by training, the sharded table and evaluation. Each is called by every rank.

They also work without a process group (world size 1), so single-process code paths and tests share them.
"""

from typing import Iterable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def comm_device() -> torch.device:
    """Where collective tensors live: CUDA under nccl, CPU under gloo (or without a group)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def even_split(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    per = (num_rows + world_size - 1) // world_size
    return min(rank * per, num_rows), min((rank + 1) * per, num_rows)


def all_gather_rows(x: torch.Tensor, sizes: list[int], fill: float | int = 0) -> torch.Tensor:
    """Concatenate every rank's (B_r, ...) tensor along dim 0; B_r may differ (`sizes`)."""
    world = len(sizes)
    if world == 1:
        return x
    pad = x.new_full((max(sizes), *x.shape[1:]), fill)
    pad[: x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def lockstep(batches: Iterable[T]) -> Iterator[Optional[T]]:
    """Yield this rank's items while ANY rank has one; None once this rank has run out.

    Ranks rarely hold equal numbers of eval batches; lookups and ranking are collectives, so
    an exhausted rank keeps taking part with empty batches until every rank is done.
    """
    it = iter(batches)
    while True:
        item = next(it, None)
        more = torch.tensor([int(item is not None)], device=comm_device())
        all_reduce(more)
        if int(more) == 0:
            return
        yield item


def gather_cols(x: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=1)
