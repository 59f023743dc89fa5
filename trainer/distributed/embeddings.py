"""The item table as a TorchRec EmbeddingCollection, sharded over the workers.

One table ("item", feature "item"), rows 0..num_items, row 0 = padding (zero: looked up as any id, its
output and gradient masked to zero, so it never changes).
Built on the meta device, planned by `EmbeddingShardingPlanner`, sharded by
`DistributedModelParallel` over the embedding module ONLY (the dense tower goes to DeepSpeed,
trainer/distributed/dense.py). The sparse optimizer is fused into the backward (FBGEMM TBE): gradients
reaching the lookup's output update the owning rank's rows during `loss.backward()`; there is
no separate sparse `step()`.

Facts this module relies on (TorchRec 1.8, CPU):
- The DENSE kernel is broken for EmbeddingCollection on CPU, so the plan is constrained to FUSED.
- Every lookup is a collective (all-to-all): all ranks must call `lookup` the same number of
  times in the same order, each with its own local ids (any count, possibly none).
- TorchRec divides the embedding gradients by the world size in the backward all-to-all
  (`comm_ops.GRADIENT_DIVISION`, on by default) before the owner sums them; DeepSpeed averages
  dense gradients. Both therefore follow the mean of the per-rank mean losses, and a 1-worker
  run on the full batch matches a W-worker run on its splits (tests/test_parallel.py checks
  this, including the Adagrad state, which would show a missing or doubled factor).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed.comm_ops import get_gradient_division
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ParameterSharding, ShardingPlan, ShardingType

from trainer.config import Config
from trainer.distributed.collectives import even_split, shard_digest, sum_digests
from trainer.distributed.context import DistContext

TABLE = "item"  # table name == feature name
WEIGHT_KEY = f"embeddings.{TABLE}.weight"  # the table's key in the DMP state dict
INIT_CHUNK_ROWS = 4096  # rows per seeded init chunk; part of the init's definition, keep fixed

SHARDING_TYPES = {
    "table_wise": ShardingType.TABLE_WISE.value,
    "row_wise": ShardingType.ROW_WISE.value,
    "column_wise": ShardingType.COLUMN_WISE.value,
}


@dataclass(frozen=True)
class Shard:
    """One piece of the table: rows [row0, row0+rows) x columns [col0, col0+cols) on `rank`."""

    rank: int
    row0: int
    rows: int
    col0: int
    cols: int


# ---------------------------------------------------------------- planning


def _gib(x: float) -> int:
    return int(x * 1024**3)


def device_memory(ctx: DistContext, cfg: Config) -> tuple[Optional[int], int]:
    """(HBM, DDR) caps in bytes per rank: from config, or what the device reports when 0.

    Host RAM is shared by the workers of one host, so it is divided by the local world size.
    """
    d = cfg.distributed
    hbm: Optional[int] = None
    if ctx.device.type == "cuda":
        hbm = _gib(d.hbm_cap_gib) if d.hbm_cap_gib > 0 else torch.cuda.get_device_properties(ctx.device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ddr = _gib(d.ddr_cap_gib) if d.ddr_cap_gib > 0 else ram // ctx.local_world_size
    return hbm, ddr


def topology(ctx: DistContext, cfg: Config) -> Topology:
    hbm, ddr = device_memory(ctx, cfg)
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=ctx.world_size, local_world_size=ctx.local_world_size, hbm_cap_bytes=hbm, ddr_cap_bytes=ddr
        ),
        kernel_config=KernelConfig(compute_device=ctx.device.type),
    )


def constraints(cfg: Config, world_size: int) -> dict[str, ParameterConstraints]:
    """FUSED kernel only; the configured sharding type, or table/row/column-wise for auto.

    Column-wise changes the sparse optimizer: FBGEMM's row-wise Adagrad keeps one statistic per
    row per shard, i.e. per column block, so results depend on the number of column shards.
    """
    sharding = cfg.distributed.sharding
    types = list(SHARDING_TYPES.values()) if sharding == "auto" else [SHARDING_TYPES[sharding]]
    min_partition = None
    if sharding == "column_wise":
        # Without this the planner keeps small tables in one column shard (its minimum shard dim
        # is 128), i.e. table-wise under another name. Split into world_size shards when possible
        # (FBGEMM wants shard dims divisible by 4).
        dim = cfg.model.dim
        if dim % world_size == 0 and (dim // world_size) % 4 == 0:
            min_partition = dim // world_size
    return {
        TABLE: ParameterConstraints(
            sharding_types=types,
            compute_kernels=[EmbeddingComputeKernel.FUSED.value],
            min_partition=min_partition,
            pooling_factors=[float(cfg.model.max_seq_len)],  # ids per sequence, for the cost model
        )
    }


def fused_params(cfg: Config, device_type: str) -> dict[str, Any]:
    """The sparse optimizer, fused into the TBE backward. Always set: without it TorchRec trains with SGD."""
    t = cfg.training
    if t.sparse_optimizer == "adam" and device_type == "cpu":
        # FBGEMM's CPU TBE supports only SGD and (row-wise) Adagrad; it asserts at construction.
        raise ValueError("training.sparse_optimizer='adam' is not supported by FBGEMM on CPU; "
                         "use 'rowwise_adagrad' (or train on GPUs)")
    kind = {"rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "adam": EmbOptimType.ADAM}[t.sparse_optimizer]
    return {"optimizer": kind, "learning_rate": t.sparse_lr, "eps": 1e-8}


def table_module(num_items: int, dim: int) -> EmbeddingCollection:
    """The unsharded table on the meta device (no memory until DMP materialises each shard)."""
    table = EmbeddingConfig(num_embeddings=num_items + 1, embedding_dim=dim, name=TABLE, feature_names=[TABLE])
    return EmbeddingCollection(tables=[table], device=torch.device("meta"))


def plan_table(module: EmbeddingCollection, sharder: EmbeddingCollectionSharder, ctx: DistContext,
               cfg: Config) -> ShardingPlan:
    planner = EmbeddingShardingPlanner(
        topology=topology(ctx, cfg),
        batch_size=cfg.training.batch_size,
        constraints=constraints(cfg, ctx.world_size),
        debug=False,
    )
    # collective_plan: rank 0 plans and broadcasts, so every rank shards identically
    return planner.collective_plan(module, [sharder], dist.GroupMember.WORLD)


def shards_of(sharding: ParameterSharding) -> list[Shard]:
    """The plan's placement of every shard, on every rank."""
    spec = sharding.sharding_spec
    assert spec is not None and hasattr(spec, "shards"), sharding
    out = []
    for md in spec.shards:
        rank = md.placement.rank()
        (row0, col0), (rows, cols) = md.shard_offsets, md.shard_sizes
        out.append(Shard(rank, row0, rows, col0, cols))
    return out


# ---------------------------------------------------------------- init


def init_chunk(seed: int, chunk: int, num_rows: int, dim: int, std: float) -> torch.Tensor:
    """Rows [chunk*INIT_CHUNK_ROWS, ...) of the initial table: a function of (seed, chunk) only."""
    row0 = chunk * INIT_CHUNK_ROWS
    n = min(INIT_CHUNK_ROWS, num_rows - row0)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + chunk) % 2**63)
    rows = torch.randn(n, dim, generator=gen) * std  # (n, D)
    if row0 == 0:
        rows[0].zero_()  # padding
    return rows


def reference_table(num_items: int, dim: int, seed: int, std: float) -> torch.Tensor:
    """The whole initial table in one process, (num_items+1, D): what the shards start from."""
    num_rows = num_items + 1
    chunks = range((num_rows + INIT_CHUNK_ROWS - 1) // INIT_CHUNK_ROWS)
    return torch.cat([init_chunk(seed, c, num_rows, dim, std) for c in chunks])


@torch.no_grad()
def fill_shard(shard: torch.Tensor, row0: int, col0: int, num_rows: int, seed: int, std: float, dim: int) -> None:
    """Write the deterministic init into one local shard (rows x cols view of the table)."""
    rows, cols = shard.shape
    first, last = row0 // INIT_CHUNK_ROWS, (row0 + rows - 1) // INIT_CHUNK_ROWS
    for chunk in range(first, last + 1):
        block = init_chunk(seed, chunk, num_rows, dim, std)  # (n, D)
        c0 = chunk * INIT_CHUNK_ROWS
        lo, hi = max(row0, c0), min(row0 + rows, c0 + block.shape[0])
        shard[lo - row0 : hi - row0].copy_(block[lo - c0 : hi - c0, col0 : col0 + cols])


# ---------------------------------------------------------------- the table


class ShardedItemTable:
    """The sharded item table: lookup, local shards, full-row blocks for evaluation, DCP state."""

    def __init__(self, cfg: Config, ctx: DistContext) -> None:
        if not get_gradient_division():
            raise RuntimeError("TorchRec gradient division is off; sparse and dense gradients would disagree")
        m = cfg.model
        self.ctx = ctx
        self.num_items, self.dim = m.num_items, m.dim
        self.num_rows = m.num_items + 1
        module = table_module(m.num_items, m.dim)
        sharder = EmbeddingCollectionSharder(fused_params=fused_params(cfg, ctx.device.type))
        self.plan = plan_table(module, sharder, ctx, cfg)
        self.sharding: ParameterSharding = self.plan.get_plan_for_module("")[TABLE]  # type: ignore[index]
        self.dmp = DistributedModelParallel(module, device=ctx.device, plan=self.plan, sharders=[sharder])
        self.init_weights(cfg.training.seed, m.init_std)

    @property
    def sharding_type(self) -> str:
        return self.sharding.sharding_type

    def placement(self) -> list[Shard]:
        """Where the plan put every shard (all ranks)."""
        return shards_of(self.sharding)

    # ------------------------------------------------------------ weights

    def local_shards(self) -> list[tuple[Shard, torch.Tensor]]:
        """This rank's shards with live views of their weights (writes go into the table)."""
        st = self.dmp.state_dict()[WEIGHT_KEY]
        out = []
        for s in st.local_shards():
            (row0, col0), (rows, cols) = s.metadata.shard_offsets, s.metadata.shard_sizes
            out.append((Shard(self.ctx.rank, row0, rows, col0, cols), s.tensor))
        return out

    @torch.no_grad()
    def init_weights(self, seed: int, std: float) -> None:
        """Rows as a function of (seed, global row), never of the rank: any world size starts equal."""
        for shard, weight in self.local_shards():
            fill_shard(weight, shard.row0, shard.col0, self.num_rows, seed, std, self.dim)

    @torch.no_grad()
    def copy_from_full(self, full: torch.Tensor) -> None:
        """Overwrite the local shards from a whole table (num_rows, D) that every rank holds."""
        assert full.shape == (self.num_rows, self.dim), full.shape
        for shard, weight in self.local_shards():
            weight.copy_(full[shard.row0 : shard.row0 + shard.rows, shard.col0 : shard.col0 + shard.cols])

    @torch.no_grad()
    def cut_pieces(self, pieces: Sequence[tuple[int, int, torch.Tensor]]) -> list[tuple[int, int, torch.Tensor]]:
        """Pieces (row0, col0, rows x cols weights) of the table cut by any plan, e.g. every rank's shards of
        another world size, re-cut to this rank's shards. Raises unless they cover every local element."""
        out = []
        for shard, weight in self.local_shards():
            mine = torch.empty(shard.rows, shard.cols, dtype=weight.dtype)
            covered = 0
            for row0, col0, piece in pieces:
                r0, r1 = max(shard.row0, row0), min(shard.row0 + shard.rows, row0 + piece.shape[0])
                c0, c1 = max(shard.col0, col0), min(shard.col0 + shard.cols, col0 + piece.shape[1])
                if r0 < r1 and c0 < c1:
                    mine[r0 - shard.row0:r1 - shard.row0, c0 - shard.col0:c1 - shard.col0] = \
                        piece[r0 - row0:r1 - row0, c0 - col0:c1 - col0]
                    covered += (r1 - r0) * (c1 - c0)
            if covered != shard.rows * shard.cols:
                raise ValueError(f"the saved pieces cover {covered} of the {shard.rows * shard.cols} weights of "
                                 f"rows {shard.row0}..{shard.row0 + shard.rows - 1}, columns {shard.col0}.."
                                 f"{shard.col0 + shard.cols - 1}")
            out.append((shard.row0, shard.col0, mine))
        return out

    @torch.no_grad()
    def write_pieces(self, pieces: Sequence[tuple[int, int, torch.Tensor]]) -> None:
        """Fill this rank's shards from pieces of any plan (`cut_pieces`)."""
        for (_, weight), (_, _, mine) in zip(self.local_shards(), self.cut_pieces(pieces)):
            weight.copy_(mine)

    @torch.no_grad()
    def gather_full(self) -> torch.Tensor:
        """The whole table on every rank, (num_rows, D). Collective; for tests and small tables."""
        full = torch.zeros(self.num_rows, self.dim, device=self.ctx.device)
        for shard, weight in self.local_shards():
            full[shard.row0 : shard.row0 + shard.rows, shard.col0 : shard.col0 + shard.cols] = weight
        dist.all_reduce(full)  # shards are disjoint: the sum of zero-filled pieces is exact
        return full

    def row_range(self, rank: Optional[int] = None) -> tuple[int, int]:
        """The even row split [start, stop) used for evaluation blocks."""
        return even_split(self.num_rows, self.ctx.rank if rank is None else rank, self.ctx.world_size)

    @torch.no_grad()
    def row_block(self) -> tuple[int, torch.Tensor]:
        """Full-width rows owned by this rank for scoring: (start, weight (n, D)). Collective.

        Row-wise plans already hold full-width row ranges, used as they are (no copy across
        ranks). Table- and column-wise plans are redistributed into an even row split: each
        target rank's block is assembled by a SUM-reduce of zero-filled pieces (exact, since the
        pieces are disjoint), one block at a time, so peak memory is one block.
        """
        mine = self.local_shards()
        if self.sharding_type == ShardingType.ROW_WISE.value:
            (shard, weight), = mine  # row-wise: one contiguous full-width range per rank
            assert shard.col0 == 0 and shard.cols == self.dim, shard
            return shard.row0, weight
        result: Optional[torch.Tensor] = None
        for target in range(self.ctx.world_size):
            start, stop = self.row_range(target)
            block = torch.zeros(stop - start, self.dim, device=self.ctx.device)  # (n, D)
            for shard, weight in mine:
                lo, hi = max(start, shard.row0), min(stop, shard.row0 + shard.rows)
                if lo < hi:
                    block[lo - start : hi - start, shard.col0 : shard.col0 + shard.cols] = weight[
                        lo - shard.row0 : hi - shard.row0
                    ]
            dist.reduce(block, dst=target)
            if target == self.ctx.rank:
                result = block
        assert result is not None
        return self.row_range()[0], result

    # ------------------------------------------------------------ lookup

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings for `ids` of any shape -> (*ids.shape, D), fp32. Collective (all-to-all)."""
        return self.lookup_parts([ids])[0]

    def lookup_parts(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Embeddings for several id tensors in ONE lookup (one all-to-all each way): each (*shape) ->
        (*shape, D), fp32. Collective: every rank calls it the same number of times, with any ids (or none).

        One TorchRec sample per row: a part of shape (..., W) is prod(...) samples of W ids (a batch of
        sequences (B, L): B samples), a 1-D part one sample. Lengths therefore follow the shapes and are built
        without reading any id on the host; padding (id 0) travels as id 0 rather than being cut out
        (compacting needs the count of real ids on the host: a device sync). Padding comes back as exact zeros
        and passes back exactly zero gradient (a `where`, not a product: even a non-finite gradient stops), so
        row 0 is looked up but never changes under any of the fused optimizers.
        """
        device = self.ctx.device
        flat, lengths, shapes = [], [], []
        for ids in parts:
            ids = ids.to(device, non_blocking=True)
            shapes.append(ids.shape)
            rows, width = (ids.shape[:-1].numel(), ids.shape[-1]) if ids.dim() >= 2 else (1, ids.numel())
            flat.append(ids.reshape(-1))
            lengths.append(torch.full((rows,), width, dtype=torch.int32, device=device))
        if sum(x.numel() for x in lengths) == 0:  # TorchRec rejects batch size 0: one empty sample
            lengths.append(torch.zeros(1, dtype=torch.int32, device=device))
        values = torch.cat(flat)  # (n,)
        kjt = KeyedJaggedTensor(keys=[TABLE], values=values, lengths=torch.cat(lengths))
        emb = self.dmp(kjt)[TABLE].values()  # (n, D), in the order of `values`
        emb = torch.where((values != 0).unsqueeze(1), emb, emb.new_zeros(()))
        return [e.view(*shape, self.dim) for e, shape in zip(emb.split([f.numel() for f in flat]), shapes)]

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Sharded weights and fused optimizer state (ShardedTensors): DCP saves/loads it in place."""
        return {"weight": self.dmp.state_dict()[WEIGHT_KEY], "optimizer": self.dmp.fused_optimizer.state_dict()}

    def digest(self) -> dict[str, float]:
        """Checksums of the weights and of each optimizer state tensor, the same under any plan (collective)."""
        state = self.state_dict()
        tensors = {"table/weight": state["weight"]}
        for per_param in state["optimizer"]["state"].values():
            tensors.update({f"table/{k}": v for k, v in per_param.items() if hasattr(v, "local_shards")})
        local = {name: sum(shard_digest(tuple(s.metadata.shard_offsets), tuple(st.size()), s.tensor)
                           for s in st.local_shards()) for name, st in tensors.items()}
        return sum_digests(local)

    def save(self, path: str) -> None:
        """Collective: every rank writes its own shards under `path` (a directory)."""
        dcp.save(self.state_dict(), checkpoint_id=path)

    def load(self, path: str) -> None:
        """Collective: read `path` into the live shards and the fused optimizer state.

        The checkpoint may come from another plan or world size: DCP reads the overlapping parts of the saved
        shards (tests/test_reshard.py). Column-wise row-wise-Adagrad state is per column block, so a change of
        the column split is refused before this (trainer/checkpoint.py `check_reshardable`).
        """
        state = self.state_dict()
        dcp.load(state, checkpoint_id=path)
        self.dmp.fused_optimizer.load_state_dict(state["optimizer"])
