"""The training loop's per-step pieces, kept free of host syncs (a GPU run never waits for the device between
logging steps): which batch each step gets, and the loss and event counts accumulated on the device.

Ranks hold unequal data, and every step is a collective, so every rank runs the same number of steps per
epoch. Instead of agreeing on that before every batch (an all-reduce and a host read per step), the ranks agree
once per epoch: each counts its batches (`WindowLoader.num_batches`), one all-reduce
takes the largest count and the position within the epoch (after a restore), and `epoch_batches` gives a rank
its batches and then None (an empty step) until that count is reached. The loader's epoch rolls over at the
same step on every rank: after the agreed last step.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist

from data.loader import Batch, WindowLoader
from trainer.distributed.collectives import comm_device
from trainer.worker.stack import Step


def agree_epoch(batches: int, consumed: int) -> tuple[int, int]:
    """(steps in this epoch, steps already taken in it) over all ranks, from this rank's batch count and the
    batches its loader has consumed in the epoch. Collective; one all-reduce and one read, once per epoch.

    A rank that still has data has consumed exactly the steps taken; one that has run out, fewer: the largest
    consumed count is the position.
    """
    both = torch.tensor([batches, consumed], dtype=torch.int64, device=comm_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
    steps, start = both.tolist()
    return steps, start


def epoch_batches(loader: WindowLoader, batches: int, steps: int, start: int) -> Iterator[Optional[Batch]]:
    """Steps `start` .. `steps`-1 of the loader's current epoch: this rank's batches (it has `batches`), then
    None. After the last step the loader is at the next epoch. Refuses a loader that yields more or fewer
    batches than counted (the ranks would fall out of step)."""
    epoch = loader.epoch
    if loader.batches_consumed != min(start, batches):
        raise RuntimeError(f"rank's loader is at batch {loader.batches_consumed} of epoch {epoch}, "
                           f"the other ranks at step {start}")
    it = iter(loader) if start < batches else None
    for k in range(start, steps):
        if k >= batches:
            yield None
            continue
        assert it is not None
        batch = next(it, None)
        if batch is None:
            raise RuntimeError(f"the loader yielded {k} batches in epoch {epoch}, {batches} were counted")
        yield batch
    if it is None:  # this rank's epoch was already consumed when the loop (re)started: just roll it over
        loader.load_state_dict({**loader.state_dict(), "epoch": epoch + 1, "batches_consumed": 0})
    elif next(it, None) is not None:
        raise RuntimeError(f"the loader yielded more than the {batches} batches counted in epoch {epoch}")
    assert loader.epoch == epoch + 1 and loader.batches_consumed == 0


class StepStats:
    """Loss and event counts accumulated on the device, read on the host only when asked (at logging steps).

    `window()` returns the loss summed over target events and the events since the last call; `total_events`
    counts all of this rank's target events.
    """

    def __init__(self, device: torch.device) -> None:
        self._loss = torch.zeros((), dtype=torch.float64, device=device)
        self._events = torch.zeros((), dtype=torch.int64, device=device)
        self.total_events = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, step: Step) -> None:
        """No host sync: `step.finite` is already on the host, the rest stays on the device."""
        if step.finite:  # a skipped step adds no loss (it is NaN) and no events (0)
            self._loss += step.loss.double() * step.events  # dummy steps of a rank out of data weigh 0
        self._events += step.events
        self.total_events += step.events

    def window(self) -> tuple[float, int]:
        """(loss sum, events) since the last call, then reset: one read of the device."""
        loss, events = torch.stack([self._loss, self._events.double()]).tolist()
        self._loss.zero_()
        self._events.zero_()
        return loss, int(events)
