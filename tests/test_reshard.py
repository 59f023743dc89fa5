"""A checkpoint of one world loads on another (2 -> 1, 1 -> 2, 2 -> 3) and another sharding (row-wise ->
table-wise), through the production Checkpointer on gloo process groups: the table and its fused optimizer
state, the dense tower's fp32 masters and AdamW moments (ZeRO-1 partitions them), the best weights of early
stopping and the data position all equal what was saved. Refusals: column-wise state, old checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import ray.train
import torch
import torch.distributed as dist

from data.config import SynthConfig
from data.loader import make_loader
from data.sequences import build_sequences
from data.synth import generate
from tests.helpers import NUM_ITEMS, SEQ, run_distributed, small_stack_config
from trainer.checkpoint import check_reshardable, write_manifest
from trainer.distributed.context import DistContext
from trainer.distributed.dense import full_dense_state, load_full_dense_state
from trainer.errors import UserError
from trainer.worker.checkpointer import Checkpointer
from trainer.worker.stack import Stack


def _config(sharding: str):
    return small_stack_config(sharding, zero=1)  # ZeRO-1: the dense optimizer state is partitioned


def _full(value: Any) -> torch.Tensor:
    """A ShardedTensor as one full tensor on every rank (ranks without a shard add zeros). Collective."""
    full = torch.zeros(value.size())
    for shard in value.local_shards():
        index = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
        full[index] = shard.tensor.view(shard.metadata.shard_sizes)
    dist.all_reduce(full)
    return full


def _everything(stack: Stack) -> dict[str, torch.Tensor]:
    """Table, its optimizer state and the dense state as full tensors, by name (collective)."""
    state = stack.table.state_dict()
    out = {"table": _full(state["weight"])}
    per_param = state["optimizer"]["state"]
    # a table-wise rank that holds no shard has no entry: the owner's shape defines the tensor
    keys = [sorted(v) for v in per_param.values()]
    names = sorted({k for ks in keys for k in ks})
    for name in names:
        local = [v[name] for v in per_param.values() if name in v]
        out[f"opt/{name}"] = _full(local[0])
    dense = full_dense_state(stack.engine)
    for name, value in dense["params"].items():
        out[f"dense/{name}"] = value
        for key, moment in dense["moments"][name].items():
            out[f"dense/{name}/{key}"] = moment
    return out


def _steps(stack: Stack, rank: int, world: int, n: int, seed: int) -> None:
    for s in range(n):
        g = torch.Generator().manual_seed(seed + 100 * s + rank)
        ids = torch.randint(1, NUM_ITEMS + 1, (4, SEQ + 1), generator=g)
        stack.train_step({"input_ids": ids[:, :-1], "targets": ids[:, 1:]}, torch.Generator().manual_seed(s))


def _save_worker(rank: int, world: int, sharding: str, root: str, seq_dir: str) -> dict[str, Any]:
    cfg = _config(sharding)
    ctx = DistContext.from_process_group()
    stack = Stack(cfg, ctx)
    loader = make_loader(seq_dir, seq_len=SEQ, batch_size=4, seed=1, rank=rank, world_size=world)
    it = iter(loader)
    _steps(stack, rank, world, 2, seed=0)
    best = stack.snapshot()  # the weights early stopping would keep
    best_full = stack.table.gather_full()
    _steps(stack, rank, world, 1, seed=50)
    for _ in range(min(3, loader.num_batches())):
        next(it)  # a position in the middle of the epoch
    state = {"step": 3, "epoch": 0, "generator": torch.Generator().manual_seed(rank).get_state(),
             "torch_rng": torch.get_rng_state(), "best": {"score": 0.5, "epoch": 0, "bad": 1, "weights": best}}
    part = Path(root) / f"part{rank}"
    Checkpointer(cfg, ctx).write(part, state, stack, loader)
    dist.barrier()
    if rank == 0:  # what Ray Train does with the ranks' directories
        for r in range(world):
            shutil.copytree(Path(root) / f"part{r}", Path(root) / "merged", dirs_exist_ok=True)
    dist.barrier()
    return {"saved": _everything(stack), "best": best_full, "loader": loader.state_dict()}


def _load_worker(rank: int, world: int, sharding: str, root: str, seq_dir: str) -> dict[str, Any]:
    cfg = _config(sharding)
    ctx = DistContext.from_process_group()
    stack = Stack(cfg, ctx)
    loader = make_loader(seq_dir, seq_len=SEQ, batch_size=4, seed=1, rank=rank, world_size=world)
    state = Checkpointer(cfg, ctx).load(ray.train.Checkpoint.from_directory(str(Path(root) / "merged")), stack,
                                        loader)
    loaded = _everything(stack)
    remaining = loader.num_batches()
    _steps(stack, rank, world, 1, seed=7)  # the loaded state trains
    trained = stack.table.gather_full()
    stack.restore(state["best"]["weights"])
    return {"loaded": loaded, "best": stack.table.gather_full(), "remaining": remaining, "trained": trained,
            "step": state["step"], "bad": state["best"]["bad"], "sharding": stack.table.sharding_type}


@pytest.fixture(scope="module")
def seq_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("reshard")
    generate(SynthConfig(users=60, items=NUM_ITEMS, days=2, seed=2, events_per_user=20, workers=1), root / "log")
    build_sequences(root / "log", root / "seq", backend="arrow")
    return str(root / "seq")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, seq_dir):
    """Checkpoints of one and of two row-wise workers: {world: (directory, the ranks' outputs)}."""
    out = {}
    for world in (1, 2):
        root = tmp_path_factory.mktemp(f"saved{world}")
        out[world] = (root, run_distributed(_save_worker, world, "row_wise", str(root), seq_dir))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(2, (1, "table_wise")), (1, (2, "row_wise")), (2, (3, "row_wise"))])
def test_checkpoint_loads_on_another_world_row_for_row(saved, seq_dir, before, after):
    root, outs = saved[before]
    loaded = run_distributed(_load_worker, after[0], after[1], str(root), seq_dir)
    want = outs[0]["saved"]
    for rank_out in loaded:
        assert rank_out["sharding"] == after[1]
        assert sorted(rank_out["loaded"]) == sorted(want)
        for name, value in want.items():
            assert torch.equal(rank_out["loaded"][name], value), name  # row for row, bit for bit
        assert torch.equal(rank_out["best"], outs[0]["best"])  # early stopping's weights, re-cut
        assert not torch.equal(rank_out["trained"], want["table"])  # and the loaded state trains on
        assert (rank_out["step"], rank_out["bad"]) == (3, 1)
    assert any(name.startswith("opt/") for name in want) and any("exp_avg" in name for name in want)
    # the data position: what the old ranks had left of the epoch, shared by the new ones
    old_total = sum(make_loader(seq_dir, seq_len=SEQ, batch_size=4, seed=1, rank=r, world_size=before)
                    .num_batches() for r in range(before))
    consumed = sum(o["loader"]["batches_consumed"] for o in outs)
    assert consumed > 0 and sum(o["remaining"] for o in loaded) == old_total - consumed


@pytest.mark.slow
def test_a_loaded_state_that_differs_from_the_saved_one_is_refused(saved, tmp_path, seq_dir):
    """The checksums rank 0 saved are checked after loading: here the saved weights' checksum is off (as if a
    resharding had misplaced rows), with the manifest rewritten so that only the checksum can tell."""
    shutil.copytree(saved[2][0] / "merged", tmp_path / "merged")
    root = tmp_path / "merged"
    meta = json.loads((root / "meta.json").read_text())
    assert set(meta["digest"]) >= {"table/weight", "table/item.momentum1"}
    meta["digest"]["table/weight"] += 1e-3
    (root / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(root / "manifests")
    write_manifest(root, 0)  # rank 0's manifest now lists every file
    (root / "manifests" / "rank1.json").write_text("{}")
    with pytest.raises(RuntimeError, match=r"on 1 worker\(s\) does not match what 2 worker\(s\) saved: table/weight"):
        run_distributed(_load_worker, 1, "row_wise", str(tmp_path), seq_dir)


def _dense_worker(rank: int, world: int, zero: int, precision: str, path: str, save: bool) -> dict[str, Any]:
    stack = Stack(small_stack_config("row_wise", zero=zero, precision=precision), DistContext.from_process_group())
    if save:
        _steps(stack, rank, world, 3, seed=0)
        state = full_dense_state(stack.engine)
        if rank == 0:
            torch.save(state, path)
        return {"state": state, "optimizer": type(stack.engine.optimizer).__name__}
    load_full_dense_state(stack.engine, torch.load(path, weights_only=False))
    state = full_dense_state(stack.engine)
    _steps(stack, rank, world, 1, seed=9)  # the optimizer steps from the loaded moments
    return {"state": state, "optimizer": type(stack.engine.optimizer).__name__}


@pytest.mark.slow
@pytest.mark.parametrize("zero, precision, before, after", [
    (0, "fp32", 1, 2),  # the client AdamW itself
    (0, "bf16", 2, 1),  # bf16 without ZeRO: fp32 copies beside the module
    (1, "bf16", 2, 3),  # ZeRO-1 fragments of bf16 parameters
    (2, "fp32", 3, 2),  # ZeRO-2
])
def test_dense_state_moves_between_worlds_under_every_zero_stage(tmp_path, zero, precision, before, after):
    """The world-size-free dense state (fp32 masters, AdamW moments, step) under each DeepSpeed optimizer."""
    path = str(tmp_path / "dense.pt")
    saved = run_distributed(_dense_worker, before, zero, precision, path, True)[0]
    loaded = run_distributed(_dense_worker, after, zero, precision, path, False)
    want = saved["state"]
    assert want["step"] >= 3.0 and all(want["moments"][name] for name in want["params"])
    for out in loaded:
        got = out["state"]
        assert got["step"] == want["step"] and sorted(got["params"]) == sorted(want["params"])
        for name, value in want["params"].items():
            assert torch.equal(got["params"][name], value), name
            for key, moment in want["moments"][name].items():
                assert torch.equal(got["moments"][name][key], moment), (name, key)
    assert loaded[0]["optimizer"] == saved["optimizer"]


def test_column_wise_and_old_checkpoints_refuse_another_world():
    cw = {"world_size": 2, "table_sharding": "column_wise", "dense_full": "dense_full.pt"}
    check_reshardable("ckpt", cw, 2, "column_wise")  # the same world and plan: fine
    check_reshardable("ckpt", cw, 2, "auto")  # the driver cannot tell yet: the worker checks
    with pytest.raises(UserError, match="column_wise table of 2 workers.*distributed.num_workers=2"):
        check_reshardable("ckpt", cw, 3, "column_wise")
    with pytest.raises(UserError, match="cannot be resumed as row_wise"):
        check_reshardable("ckpt", cw, 2, "row_wise")
    rw = {**cw, "table_sharding": "row_wise"}
    check_reshardable("ckpt", rw, 3, "table_wise")
    with pytest.raises(UserError, match="cannot be resumed as column_wise"):
        check_reshardable("ckpt", rw, 2, "column_wise")
    old = {"world_size": 2}  # written before dense_full.pt existed
    check_reshardable("ckpt", old, 2, "row_wise")
    with pytest.raises(UserError, match="without dense_full.pt; resume it with distributed.num_workers=2"):
        check_reshardable("ckpt", old, 1, "row_wise")


def test_shard_digests_add_up_under_any_cut_and_see_one_changed_element(monkeypatch):
    from trainer.distributed import collectives
    from trainer.distributed.collectives import shard_digest

    monkeypatch.setattr(collectives, "DIGEST_ROWS", 7)  # several chunks per shard
    full = torch.randn(50, 6)
    whole = shard_digest((0, 0), (50, 6), full)
    rows = shard_digest((0, 0), (50, 6), full[:23]) + shard_digest((23, 0), (50, 6), full[23:])
    cols = shard_digest((0, 0), (50, 6), full[:, :4]) + shard_digest((0, 4), (50, 6), full[:, 4:])
    assert rows == pytest.approx(whole, rel=1e-12) and cols == pytest.approx(whole, rel=1e-12)
    changed = full.clone()
    changed[31, 2] += 1e-3
    assert shard_digest((0, 0), (50, 6), changed) != pytest.approx(whole, rel=1e-12)
    swapped = full.clone()
    swapped[[3, 4]] = swapped[[4, 3]]  # same values, other places
    assert shard_digest((0, 0), (50, 6), swapped) != pytest.approx(whole, rel=1e-12)
