"""`DistContext`: the one object that knows this worker's world size, ranks and device.

The process group always comes from outside (Ray Train in production, a gloo group in tests); nothing
here creates one.
"""

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


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
