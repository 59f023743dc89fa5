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


def padded(items: Iterable[T], count: int) -> Iterator[Optional[T]]:
    """This rank's items, then None up to `count` in all.

    Ranks rarely hold equal numbers of eval batches; lookups and ranking are collectives, so an exhausted
    rank keeps taking part with empty batches. `count` is the largest rank's number of items, known to every
    rank beforehand (from file metadata), so the ranks never agree per item (a collective and a host read
    each). Refuses more items than `count`: the ranks would fall out of step.
    """
    it = iter(items)
    for _ in range(count):
        yield next(it, None)
    if next(it, None) is not None:
        raise RuntimeError(f"more than the {count} items every rank was told to expect")


def gather_cols(x: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=1)


DIGEST_ROWS = 1 << 16  # rows per chunk of the digest's weights (bounded memory on any table)


def sum_digests(local: dict[str, float]) -> dict[str, float]:
    """Every rank's digest terms summed by name (ranks may hold terms of different names). Collective."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(local)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    out: dict[str, float] = {}
    for part in parts:
        for name, value in part.items():
            out[name] = out.get(name, 0.0) + value
    return out


def shard_digest(offsets: tuple[int, ...], size: tuple[int, ...], local: torch.Tensor) -> float:
    """This rank's term of a position-sensitive checksum of a tensor of global `size` cut into shards: the sum
    of each element times a pseudo-random weight of its global index. The terms of any sharding of the same
    tensor add up to the same value (up to float64 rounding), so a reloaded, resharded state can be checked
    against the saved one without gathering it. `local`: the shard at `offsets`. Memory: DIGEST_ROWS rows at a
    time in float64, never a float64 copy of the shard (2x its fp32 bytes: 12.8 GB for 5x10^7 x 64 rows)."""
    if local.numel() == 0:
        return 0.0
    shape = local.shape if local.dim() else (1,)
    t = local.detach().reshape(shape[0], -1)  # (rows, rest), in its own dtype: float64 chunk by chunk below
    strides = [1] * len(size)
    for i in range(len(size) - 2, -1, -1):
        strides[i] = strides[i + 1] * size[i + 1]
    rest = torch.zeros(1, dtype=torch.int64)  # global offset of each element of a row, (rest,)
    for dim in range(1, len(shape)):
        idx = (offsets[dim] + torch.arange(shape[dim])) * strides[dim]
        rest = (rest[:, None] + idx[None, :]).flatten()
    total = 0.0
    for a in range(0, shape[0], DIGEST_ROWS):
        rows = (offsets[0] + torch.arange(a, min(a + DIGEST_ROWS, shape[0]))) * (strides[0] if size else 1)
        index = rows[:, None] + rest[None, :]  # (chunk, rest) global linear indices
        weight = (index % 2147483647 * 2654435761 % 2147483647).double() / 2147483647 + 0.5
        total += float((t[a:a + DIGEST_ROWS].to("cpu", torch.float64) * weight).sum())
    return total
