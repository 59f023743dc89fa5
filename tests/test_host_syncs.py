"""Host syncs per training step: at most one between logging steps, none in the loss or the lookup.

A host sync is a read of a tensor's value into Python (item, tolist, bool, int, float, .cpu(), .numpy()) or an
op whose output size depends on values (boolean-mask indexing, nonzero): on a GPU each one waits for every
queued kernel. They cost nothing on CPU, so they are counted here by patching torch.Tensor (tests/syncs.py)
around real steps: 2 gloo ranks, Stack.train_step plus the loop's per-step bookkeeping (StepStats), one rank
running out of data. Before #14 a step made 10 in this repository's code (the non-finite flag, loss.item() and
torch.isfinite in the loop, lockstep's all-reduce + int(), flat[keep] and nonzero in the lookup, two boolean
masks and two .cpu() round trips in the loss and sampler, bool(key_valid.all()) per attention layer); now 1,
the agreed non-finite flag that must be on the host before the backward (trainer/worker/stack.py).

Syncs inside torch, TorchRec and DeepSpeed are listed, not bounded (TorchRec's input dist reads its splits on
the host; the CPU-only FBGEMM kernels and torch's CPU AdamW read scalars).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from data.config import SynthConfig
from data.loader import WindowLoader
from data.sequences import build_sequences
from data.synth import generate
from model.config import LossConfig
from tests.helpers import NUM_ITEMS, SEQ, run_distributed, small_stack_config
from tests.syncs import HostSyncs
from trainer.worker.steps import StepStats, epoch_batches

STEPS = 4
MAX_SYNCS_PER_STEP = 1

CASES = {
    "dwc-popularity-inbatch": dict(mixer="dwc", loss=LossConfig(num_negatives=8, sampler="popularity",
                                                                in_batch_negatives=True)),
    "attention-uniform-last": dict(mixer="attention", positions="last", loss=LossConfig(num_negatives=8)),
    "fft-bce": dict(mixer="fft", loss=LossConfig(type="bce")),
}


def _sync_worker(rank: int, world: int) -> dict[str, dict[str, Any]]:
    """Every case in one process group (a group per case would spend most of the test starting processes)."""
    return {case: _count_syncs(rank, case) for case in CASES}


def _count_syncs(rank: int, case: str) -> dict[str, Any]:
    from trainer.distributed.context import DistContext
    from trainer.worker.stack import Stack

    kw = dict(CASES[case])
    mixer = kw.pop("mixer")
    cfg = small_stack_config("row_wise", **kw)
    cfg.model.mixer = mixer
    cfg.model.kernel_size = SEQ if mixer == "fft" else 3
    cfg.model.num_heads = 2
    counts = np.random.default_rng(0).integers(0, 50, NUM_ITEMS + 1)
    stack = Stack(cfg, DistContext.from_process_group(), counts)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(1, NUM_ITEMS + 1, (4, SEQ + 1), generator=gen)
    ids[:2, :3] = 0  # left padding
    batches = [{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}] * STEPS
    if rank == 1:
        batches = batches[:1] + [None] * (STEPS - 1)  # rank 1 runs out of data after one batch
    stack.train_step(batches[0], gen)  # warm-up: first-call setup is not a step's cost
    stats = StepStats(stack.ctx.device)
    with HostSyncs() as syncs:
        finite = []
        for batch in batches:
            step = stack.train_step(batch, gen)
            stats.add(step)
            finite.append(step.finite)
    with HostSyncs() as at_log:
        loss_sum, events = stats.window()
    return {"ours": syncs.summary("ours"), "others": syncs.summary("others"), "log": len(at_log.ours),
            "finite": finite, "loss_sum": loss_sum, "events": events}


def test_at_most_one_host_sync_per_step() -> None:
    runs = run_distributed(_sync_worker, 2)
    for case in CASES:
        _check_case(case, [r[case] for r in runs])


def _check_case(case: str, out: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(out):
        assert all(r["finite"]), case
        ours = sum(r["ours"].values())
        print(f"rank {rank} {case}: {ours / STEPS:.1f} host syncs per step from this repository: {r['ours']}; "
              f"inside torch / TorchRec / DeepSpeed: {sum(r['others'].values()) / STEPS:.1f} per step")
        assert ours <= MAX_SYNCS_PER_STEP * STEPS, (case, r["ours"])
        for where in r["ours"]:  # and that one is the agreed flag in the step, never the loss or lookup
            assert "trainer/worker/stack.py" in where, (case, where)
        assert r["log"] == 1  # a logging step reads loss and events once
        assert r["events"] > 0 and np.isfinite(r["loss_sum"]) and r["loss_sum"] > 0
    assert out[0]["events"] > out[1]["events"], case  # rank 1's empty steps count no events


def test_the_counter_sees_the_syncs_it_should() -> None:
    """The patch catches each kind of read (a counter that saw nothing would pass the bound vacuously)."""
    x = torch.arange(6.0)
    with HostSyncs() as s:
        x.sum().item()
        bool(x.any())
        int(x[0])
        float(x[1])
        x[x > 2]
        x.nonzero()
        x.tolist()
        x.cpu()
    kinds = [k for k, _ in s.ours + s.others]
    assert kinds == ["item", "__bool__", "__int__", "__float__", "bool-mask index", "nonzero", "tolist", "cpu"]
    with HostSyncs() as none:
        y = torch.where(x > 2, x, 0.0)
        (y * 2).sum()
        x[torch.tensor([1, 2])]  # integer indexing sizes the output by the index's shape: no sync
    assert not none.ours and not none.others


# ---------------------------------------------------------------- steps per epoch, agreed once


@pytest.fixture(scope="module")
def seq_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("steps")
    cfg = SynthConfig(users=120, items=50, days=2, seed=1, events_per_user=25, users_per_chunk=60, workers=1)
    generate(cfg, root / "log")
    build_sequences(root / "log", root / "seq", backend="arrow", rows_per_bucket=500)
    return root / "seq"


def _loader(seq_dir: Path, rank: int = 0, world: int = 1, drop_last: bool = False, batch: int = 16) -> WindowLoader:
    return WindowLoader(seq_dir, seq_len=8, batch_size=batch, seed=2, shuffle_buffer=64, rank=rank,
                        world_size=world, drop_last=drop_last, read_rows=32)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("rank,world", [(0, 1), (0, 3), (2, 3)])
def test_num_batches_counts_the_epoch(seq_dir: Path, drop_last: bool, rank: int, world: int) -> None:
    loader = _loader(seq_dir, rank, world, drop_last)
    n = loader.num_batches()
    assert n == len(list(loader)) == len(list(loader)) > 0  # two epochs, the same count


def _ids(batches) -> list:
    return [None if b is None else b["input_ids"].tolist() for b in batches]


def test_epoch_batches_pads_with_empty_steps_and_rolls_the_epoch(seq_dir: Path) -> None:
    loaders = [_loader(seq_dir, r, 3, batch=8) for r in range(3)]
    counts = [lo.num_batches() for lo in loaders]
    steps = max(counts)
    assert len(set(counts)) > 1  # unequal data: some rank gets empty steps
    reference = [_ids(_loader(seq_dir, r, 3, batch=8)) for r in range(3)]  # plain iteration, epoch 0
    for r, lo in enumerate(loaders):
        got = _ids(epoch_batches(lo, counts[r], steps, 0))
        assert got == reference[r] + [None] * (steps - counts[r])
        assert (lo.epoch, lo.batches_consumed) == (1, 0)  # every rank rolls over after the agreed last step


def test_epoch_batches_resumes_mid_epoch_on_every_rank(seq_dir: Path) -> None:
    """Stop at step k (a rank already out of data included), restore each loader's state, continue: the same
    steps as an uninterrupted epoch."""
    full = [_loader(seq_dir, r, 3, batch=8) for r in range(3)]
    counts = [lo.num_batches() for lo in full]
    steps = max(counts)
    k = min(counts) + 1  # the smallest rank is already exhausted at the restart
    assert k < steps
    for r in range(3):
        uninterrupted = _ids(epoch_batches(full[r], counts[r], steps, 0))
        first = _loader(seq_dir, r, 3, batch=8)
        gen = epoch_batches(first, counts[r], steps, 0)
        head = [next(gen) for _ in range(k)]
        gen.close()
        resumed = _loader(seq_dir, r, 3, batch=8)
        resumed.load_state_dict(first.state_dict())
        start = k  # what agree_epoch returns: the largest batches_consumed over the ranks
        tail = _ids(epoch_batches(resumed, counts[r], steps, start))
        assert _ids(head) + tail == uninterrupted, r
        assert (resumed.epoch, resumed.batches_consumed) == (1, 0)


def test_epoch_batches_refuses_a_wrong_count(seq_dir: Path) -> None:
    n = _loader(seq_dir).num_batches()
    with pytest.raises(RuntimeError, match="counted"):
        list(epoch_batches(_loader(seq_dir), n - 1, n, 0))
    with pytest.raises(RuntimeError, match="counted"):
        list(epoch_batches(_loader(seq_dir), n + 1, n + 1, 0))
