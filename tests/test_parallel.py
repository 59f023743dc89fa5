"""TorchRec sharded table + DeepSpeed dense tower, on 2-process gloo groups, against 1 process.

Each test runs a module-level worker function in fresh processes (tests/helpers.py `run_distributed`)
and compares what the ranks return with a single-process or unsharded reference. Training goes through
the production step, `trainer.worker.stack.Stack.train_step`.
"""

from __future__ import annotations

import functools
from typing import Any

import deepspeed
import deepspeed.comm.comm as ds_comm
import pytest
import torch
import torch.distributed as dist

from model.config import LossConfig
from model.convformer import SequenceEncoder
from tests.helpers import DIM, NUM_ITEMS, SEQ, run_distributed
from tests.helpers import small_stack_config as small_config
from trainer.config import Config
from trainer.distributed.context import DistContext
from trainer.distributed.dense import deepspeed_config, init_deepspeed_comm, wrap_dense
from trainer.distributed.embeddings import ShardedItemTable, fused_params, reference_table
from trainer.worker.stack import Stack

PLANS = ["table_wise", "row_wise", "column_wise"]


def reference(cfg: Config) -> torch.Tensor:
    return reference_table(cfg.model.num_items, cfg.model.dim, cfg.training.seed, cfg.model.init_std)


# ---------------------------------------------------------------- workers (run in child processes)


def _lookup_worker(rank: int, world: int, sharding: str) -> dict[str, Any]:
    cfg = small_config(sharding)
    ctx = DistContext.from_process_group()
    assert (ctx.rank, ctx.world_size, ctx.device.type, ctx.backend) == (rank, world, "cpu", "gloo")
    table = ShardedItemTable(cfg, ctx)
    gen = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, NUM_ITEMS + 1, (3, 5), generator=gen)
    ids[0, :2] = 0  # left padding
    with torch.no_grad():
        emb = table.lookup(ids)
        empty = table.lookup(torch.zeros(0, dtype=torch.long))  # a rank with no ids still takes part
    return {"ids": ids, "emb": emb, "empty": empty.shape, "full": table.gather_full(),
            "placement": table.placement(), "local": [(s, w.clone()) for s, w in table.local_shards()],
            "type": table.sharding_type}


def _batch(step: int, rank: int, world: int, batch_total: int) -> dict[str, torch.Tensor]:
    """Step `step`'s global batch of left-padded sequences; rank r takes its contiguous split."""
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, NUM_ITEMS + 1, (batch_total, SEQ + 1), generator=gen)
    lengths = torch.randint(2, SEQ + 2, (batch_total,), generator=gen)
    ids[torch.arange(SEQ + 1)[None, :] < (SEQ + 1 - lengths)[:, None]] = 0  # left padding
    per = batch_total // world
    ids = ids[rank * per : (rank + 1) * per]
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}  # (B, L) each


def _train_worker(rank: int, world: int, cfg: Config, steps: int, batch_total: int) -> dict[str, Any]:
    """`steps` production steps on a fixed global batch of `batch_total` sequences split over the ranks."""
    stack = Stack(cfg, DistContext.from_process_group())
    table, engine = stack.table, stack.engine
    init_local = [(s, w.clone()) for s, w in table.local_shards()]
    no_shm_build = ds_comm.cdb.shm_comm_op is None  # the ~50 s JIT build of DeepSpeed's shm op was skipped
    losses = []
    for step in range(steps):
        negatives = torch.Generator().manual_seed(2000 + step)  # the same negatives on every rank
        losses.append(stack.train_step(_batch(step, rank, world, batch_total), negatives).loss.item())
    dense = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])
    return {"dense": dense, "full": table.gather_full(), "losses": losses, "placement": table.placement(),
            "lrs": stack.learning_rates(),
            "momentum": _gather_sharded(next(iter(table.state_dict()["optimizer"]["state"].values())))
            if table.sharding_type == "row_wise" else None,  # every rank holds state only when row-wise
            "init_local": init_local, "local": [(s, w.clone()) for s, w in table.local_shards()],
            "checkpoint_blocks": engine.module.checkpoint_blocks, "no_shm_build": no_shm_build}


def _empty_rank_worker(rank: int, world: int, loss_scale: float) -> dict[str, Any]:
    """Rank 1 runs out of data (the step gets None) while rank 0 still trains: both must join every
    collective (the lookup in forward, its all-to-alls in backward, DeepSpeed's reductions).
    Run alone (world 1) with loss_scale 1/2, rank 0's batch is the reference."""
    cfg = small_config("row_wise", loss=LossConfig(num_negatives=8))
    stack = Stack(cfg, DistContext.from_process_group())
    ids = torch.randint(1, NUM_ITEMS + 1, (4, SEQ + 1), generator=torch.Generator().manual_seed(5))
    batch = None if rank == 1 else {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    losses = []
    for _ in range(2):
        negatives = torch.Generator().manual_seed(9)
        if loss_scale == 1.0:
            loss = stack.train_step(batch, negatives).loss
        else:  # the reference: the same step with the loss scaled
            loss, _ = stack.loss(batch, negatives)
            stack.engine.backward(loss * loss_scale)
            stack.engine.step()
        losses.append(loss.item())
    return {"losses": losses, "dense": torch.cat([p.detach().flatten() for p in stack.engine.module.parameters()]),
            "full": stack.table.gather_full()}


def _gather_sharded(states: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every ShardedTensor of an optimizer state as one full tensor (disjoint shards summed)."""
    out = {}
    for name, st in states.items():
        full = torch.zeros(st.size())
        for shard in st.local_shards():
            index = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
            full[index] = shard.tensor.view(shard.metadata.shard_sizes)
        dist.all_reduce(full)
        out[name] = full
    return out


def _broadcast_trap_worker(rank: int, world: int) -> dict[str, Any]:
    """What happens when DeepSpeed is handed a module that CONTAINS the sharded table."""
    cfg = small_config("row_wise")
    ctx = DistContext.from_process_group()
    table = ShardedItemTable(cfg, ctx)
    before = [w.clone() for _, w in table.local_shards()]
    try:  # our entry point refuses it
        wrap_dense(torch.nn.ModuleDict({"table": table.dmp, "enc": SequenceEncoder(cfg.model)}), cfg, ctx)
        refused = False
    except ValueError:
        refused = True
    # ... and plain DeepSpeed shows why: rank 0's shard is broadcast over rank 1's
    both = torch.nn.ModuleDict({"table": table.dmp, "enc": SequenceEncoder(cfg.model)})
    init_deepspeed_comm(ctx)
    opt = torch.optim.AdamW([p for p in both.parameters() if p.requires_grad], lr=1e-3)
    deepspeed.initialize(model=both, optimizer=opt, config=deepspeed_config(cfg, ctx), dist_init_required=False)
    after = [w.clone() for _, w in table.local_shards()]
    return {"before": before, "after": after, "refused": refused}


def _checkpoint_worker(rank: int, world: int, sharding: str, path: str) -> dict[str, Any]:
    cfg = small_config(sharding)
    table = ShardedItemTable(cfg, DistContext.from_process_group())

    def train_step(seed: int) -> None:
        ids = torch.randint(1, NUM_ITEMS + 1, (8,), generator=torch.Generator().manual_seed(seed))
        table.lookup(ids).pow(2).sum().backward()

    def snapshot() -> list[torch.Tensor]:
        state = table.state_dict()
        tensors = [s.tensor.clone() for s in state["weight"].local_shards()]
        for per_param in state["optimizer"]["state"].values():
            for value in per_param.values():
                tensors += [s.tensor.clone() for s in value.local_shards()] if hasattr(value, "local_shards") \
                    else [torch.as_tensor(value).clone()]
        return tensors

    train_step(rank)  # non-trivial optimizer state
    table.save(path)
    saved = snapshot()
    train_step(10 + rank)  # perturb weights and optimizer state
    perturbed = snapshot()
    table.load(path)
    loaded = snapshot()
    # the loaded state is live: one more identical step from it gives identical results
    train_step(20 + rank)
    after_a = snapshot()
    table.load(path)
    train_step(20 + rank)
    after_b = snapshot()
    return {"saved": saved, "perturbed": perturbed, "loaded": loaded, "after_a": after_a, "after_b": after_b}


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("sharding", PLANS)
def test_sharded_lookup_equals_reference_table(sharding: str) -> None:
    cfg = small_config(sharding)
    ref = reference(cfg)
    assert torch.count_nonzero(ref[0]) == 0 and torch.count_nonzero(ref[1:]) == ref[1:].numel()
    two = run_distributed(_lookup_worker, 2, sharding)
    one = run_distributed(_lookup_worker, 1, sharding)
    for out in two + one:
        assert out["type"] == sharding
        assert torch.equal(out["emb"], ref[out["ids"]])  # padding id 0 -> the zero row
        assert out["empty"] == (0, DIM)
        assert torch.equal(out["full"], ref)  # 1 and 2 workers start from the identical table
    # each rank holds exactly the planner's shards for it, filled from the reference
    placement = two[0]["placement"]
    assert placement == two[1]["placement"]
    if sharding != "table_wise":
        assert {s.rank for s in placement} == {0, 1}, placement  # really split over both ranks
    for rank, out in enumerate(two):
        planned = [s for s in placement if s.rank == rank]
        assert [s for s, _ in out["local"]] == planned
        for s, w in out["local"]:
            assert torch.equal(w, ref[s.row0 : s.row0 + s.rows, s.col0 : s.col0 + s.cols])


def test_deepspeed_must_not_wrap_the_table() -> None:
    out = run_distributed(_broadcast_trap_worker, 2)
    assert out[0]["refused"] and out[1]["refused"]
    (r0_before,), (r1_before,) = out[0]["before"], out[1]["before"]
    (r0_after,), (r1_after,) = out[0]["after"], out[1]["after"]
    assert not torch.equal(r0_before, r1_before)  # distinct rows before
    assert torch.equal(r0_after, r0_before)
    # The trap: DeepSpeed's initial broadcast copied rank 0's rows over rank 1's shard.
    assert torch.equal(r1_after, r0_before), "DeepSpeed no longer broadcasts module params: see docs/dependencies.md"


@functools.cache
def _one_worker(sharding: str, steps: int, batch_total: int) -> tuple[Config, dict[str, Any]]:
    """The full batch on 1 rank. ZeRO partitions nothing on one rank, so stage 0 is the reference for every stage."""
    cfg = small_config(sharding, zero=0, batch=batch_total, positions="last", loss=LossConfig(num_negatives=16))
    (one,) = run_distributed(_train_worker, 1, cfg, steps, batch_total)
    return cfg, one


@pytest.mark.parametrize("sharding,zero", [("row_wise", 0), ("row_wise", 1), ("row_wise", 2), ("table_wise", 0)])
def test_two_workers_match_one_worker(sharding: str, zero: int) -> None:
    """Split batches on 2 ranks == the full batch on 1 rank: dense params, table, loss.

    Not column-wise: FBGEMM's row-wise Adagrad keeps one statistic per row PER SHARD, so
    splitting columns changes the optimizer (by design, not a bug here).
    """
    steps, batch_total = 3, 8
    # the loss at the last position: every sequence weighs the same, so the ranks' mean losses average to
    # the full batch's
    cfg2 = small_config(sharding, zero=zero, batch=batch_total // 2, positions="last",
                        loss=LossConfig(num_negatives=16))
    two = run_distributed(_train_worker, 2, cfg2, steps, batch_total)
    cfg1, one = _one_worker(sharding, steps, batch_total)
    assert all(out["no_shm_build"] for out in two + [one])
    for out in two:  # what the progress records report: the optimizers' own rates
        assert out["lrs"] == pytest.approx({"lr/dense": cfg2.training.lr, "lr/sparse": cfg2.training.sparse_lr})
    # dense parameters identical across ranks (DeepSpeed averaged the gradients)
    assert torch.equal(two[0]["dense"], two[1]["dense"])
    torch.testing.assert_close(two[0]["dense"], one["dense"], rtol=1e-4, atol=1e-5)
    assert not torch.equal(one["dense"], run_init_dense(cfg1))  # it did train
    # the table: shards stay where the planner put them, distinct per rank, equal to 1 worker's
    assert torch.equal(two[0]["full"], two[1]["full"])
    torch.testing.assert_close(two[0]["full"], one["full"], rtol=1e-4, atol=1e-5)
    assert not torch.equal(one["full"], reference(cfg1))
    for rank, out in enumerate(two):
        planned = [s for s in out["placement"] if s.rank == rank]
        assert [s for s, _ in out["local"]] == planned
        for s, w in out["local"]:
            assert torch.equal(w, out["full"][s.row0 : s.row0 + s.rows, s.col0 : s.col0 + s.cols])
    if sharding == "row_wise":
        assert not torch.equal(two[0]["local"][0][1][:20], two[1]["local"][0][1][:20])
    # the per-rank losses average to the full-batch loss
    mean_loss = [(a + b) / 2 for a, b in zip(two[0]["losses"], two[1]["losses"])]
    assert mean_loss == pytest.approx(one["losses"], rel=1e-4)
    # the sparse optimizer saw the same gradients (row-wise Adagrad's update hides a constant
    # factor on the gradient, its accumulated state does not)
    if sharding != "row_wise":
        return
    assert two[0]["momentum"].keys() == one["momentum"].keys()
    for name, value in one["momentum"].items():
        assert value.abs().sum() > 0
        torch.testing.assert_close(two[0]["momentum"][name], value, rtol=1e-4, atol=1e-9)


def run_init_dense(cfg: Config) -> torch.Tensor:
    torch.manual_seed(cfg.training.seed)
    return torch.cat([p.detach().flatten() for p in SequenceEncoder(cfg.model).parameters()])


@pytest.mark.parametrize("sharding,zero", [("column_wise", 1), ("table_wise", 0)])
def test_bf16_with_checkpointing_trains_and_stays_finite(sharding: str, zero: int) -> None:
    cfg = small_config(sharding, zero=zero, precision="bf16")
    cfg.distributed.activation_checkpointing = True
    two = run_distributed(_train_worker, 2, cfg, 2, 8)
    for out in two:
        assert out["checkpoint_blocks"]
        assert all(torch.isfinite(torch.tensor(out["losses"])))
        assert torch.isfinite(out["dense"]).all() and torch.isfinite(out["full"]).all()
    assert torch.equal(two[0]["dense"], two[1]["dense"])
    assert not torch.equal(two[0]["full"], reference(cfg))


@pytest.mark.parametrize("sharding", ["row_wise", "column_wise"])
def test_checkpoint_round_trip(sharding: str, tmp_path: Any) -> None:
    out = run_distributed(_checkpoint_worker, 2, sharding, str(tmp_path / "table"))
    for rank_out in out:
        saved, perturbed, loaded = rank_out["saved"], rank_out["perturbed"], rank_out["loaded"]
        assert len(saved) >= 2  # weights and optimizer state
        assert any(not torch.equal(a, b) for a, b in zip(saved, perturbed))
        for a, b in zip(saved, loaded):
            assert torch.equal(a, b)
        for a, b in zip(rank_out["after_a"], rank_out["after_b"]):
            assert torch.equal(a, b)


def test_sparse_adam_is_refused_on_cpu() -> None:
    cfg = small_config(sparse_optimizer="adam")
    with pytest.raises(ValueError, match="sparse_optimizer"):
        fused_params(cfg, "cpu")
    assert fused_params(cfg, "cuda")["learning_rate"] == cfg.training.sparse_lr


def test_a_rank_without_data_still_joins_the_step() -> None:
    """Mean of (rank 0's loss, nothing) == rank 0's batch alone at half the loss."""
    out = run_distributed(_empty_rank_worker, 2, 1.0, timeout=90)
    (alone,) = run_distributed(_empty_rank_worker, 1, 0.5, timeout=90)
    assert out[1]["losses"] == [0.0, 0.0]
    assert out[0]["losses"] == pytest.approx(alone["losses"], rel=1e-5)
    assert torch.equal(out[0]["dense"], out[1]["dense"])
    torch.testing.assert_close(out[0]["dense"], alone["dense"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0]["full"], alone["full"], rtol=1e-4, atol=1e-5)
