"""Streaming training loader: user sequences -> shuffled batches of left-padded windows.

The source is a directory of sequence shards (user_id, item_ids); worker `rank` of `world_size` streams
its contiguous share of the rows with pyarrow (data/shards.py), in one process, under Ray Train or not.

Windows. A user's items x_0..x_{n-1} give n-1 next-item transitions; they are cut from the newest end
into windows of L transitions, so every transition is a target exactly once per epoch:
    input_ids  (L,)  x_{s}   .. x_{e-1}   left-padded with 0
    targets    (L,)  x_{s+1} .. x_{e}     0 where the input is padding
Users with one event give no window. The last (oldest) window of a user is the only partial one.

Order and resumption. An epoch's batches are a pure function of (seed, epoch, rank, world_size) and the
files: the share's row-group pieces are visited in an order permuted by (seed, epoch), and windows are
shuffled in buffers of `shuffle_buffer` windows with a generator seeded by (seed, epoch, rank): rank r's
"stream" of world W. `state_dict()` is (epoch, batches consumed, and the plan of the epoch when it is not the
rank's own stream); a restored loader replays the epoch up to that point without building tensors and then
yields exactly the batches an uninterrupted loader would have.

Another world size. The position is kept in global terms: `reshard_state` takes every old rank's state and
gives a rank of the new world its share of what the epoch has left, as a plan of segments (W, r, start, stop)
= batches start..stop-1 of rank r's stream of world W. The remaining batches of all old ranks, in rank order,
are split into contiguous runs of nearly equal length, so no window is skipped or repeated in the epoch; the
next epoch is the new world's own.

Prefetching. With `prefetch` > 0 the batches are made in a background thread (data/prefetch.py), up to that
many ahead, pinned when `pin_memory` (for non-blocking copies to a GPU). The batches and their order are the
same; the position (`batches_consumed`) counts what the consumer took, not what the thread made.
"""

import os
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import torch

from data.prefetch import Prefetcher
from data.schema import USER
from data.sequences import list_parts, sequence_files
from data.shards import RowShard

Batch = dict[str, torch.Tensor]
Segment = tuple[int, int, int, int]  # (world size, rank, first batch, end batch) of one stream


def cut_windows(user: np.ndarray, off: np.ndarray, items: np.ndarray, seq_len: int):
    """Rows (user (R,), offsets (R+1,), flat items) -> user ids (W,), input ids (W, L), targets (W, L)."""
    L = seq_len
    n = np.diff(off)  # (R,) events per user
    k = np.where(n >= 2, (n - 2) // L + 1, 0)  # windows per user: ceil((n - 1) / L)
    row = np.repeat(np.arange(len(n)), k)  # (W,)
    j = np.arange(len(row)) - np.repeat(np.cumsum(k) - k, k)  # window number from the newest, (W,)
    end = n[row] - 1 - j * L  # index of the last target within the user's items
    length = np.minimum(L, end)  # transitions in the window (the oldest window may be short)
    col = np.arange(L)[None, :]  # (1, L)
    valid = col >= (L - length)[:, None]  # (W, L) left padding is invalid
    tgt_pos = off[row][:, None] + end[:, None] - (L - 1) + col  # (W, L) flat positions of the targets
    tgt = np.where(valid, items[np.clip(tgt_pos, 0, len(items) - 1)], 0)
    inp = np.where(valid, items[np.clip(tgt_pos - 1, 0, len(items) - 1)], 0)
    return user[row], inp.astype(np.int64), tgt.astype(np.int64)


class WindowLoader:
    """Iterate one epoch per `for batch in loader`; see the module docstring for order and resumption."""

    def __init__(
        self,
        source: Union[str, os.PathLike],
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 8192,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        read_rows: int = 1024,
        prefetch: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if seq_len < 1 or batch_size < 1 or shuffle_buffer < 1:
            raise ValueError("seq_len, batch_size and shuffle_buffer must be >= 1")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.source = source
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last
        self.rank, self.world_size, self.read_rows = rank, world_size, read_rows
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.files = sequence_files(source)
        self.shard = RowShard(self.files, rank, world_size)
        self.epoch = 0
        self.batches_consumed = 0
        self.plan: Optional[tuple[int, list[Segment]]] = None  # (epoch, segments) when not the own stream
        self._own_batches: Optional[int] = None

    # ------------------------------------------------------------ position

    def state_dict(self) -> dict:
        plan = self._plan()
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank,
                "plan": None if plan is None else {"epoch": self.epoch, "segments": [list(s) for s in plan]}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        if (state.get("world_size", self.world_size), state.get("rank", self.rank)) != (self.world_size, self.rank):
            raise ValueError(f"loader state of rank {state['rank']} of {state['world_size']} given to rank "
                             f"{self.rank} of {self.world_size}; use reshard_state")
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])
        plan = state.get("plan")
        self.plan = None if plan is None else (int(plan["epoch"]), [tuple(map(int, s)) for s in plan["segments"]])

    def _plan(self) -> Optional[list[Segment]]:
        """This epoch's segments when it is not this rank's own stream (a resharded epoch), else None."""
        return self.plan[1] if self.plan is not None and self.plan[0] == self.epoch else None

    def num_batches(self) -> int:
        """Batches in the current epoch. The own stream has the same count every epoch (the order changes,
        the windows do not), counted once from the list lengths of the share's rows, without cutting windows."""
        plan = self._plan()
        if plan is not None:
            return sum(stop - start for _, _, start, stop in plan)
        if self._own_batches is None:
            self._own_batches = self.stream_batches(self.world_size, self.rank)
        return self._own_batches

    def stream_batches(self, world_size: int, rank: int) -> int:
        """Batches per epoch of rank `rank`'s stream in a world of `world_size` (one read of its item lists)."""
        windows = 0
        for table in RowShard(self.files, rank, world_size).iter_tables(["item_ids"], self.read_rows):
            off, _ = list_parts(table.column("item_ids"))
            n = np.diff(off)
            windows += int(np.where(n >= 2, (n - 2) // self.seq_len + 1, 0).sum())
        full, rest = divmod(windows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    # ------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Batch]:
        epoch, skip = self.epoch, self.batches_consumed
        made = self._tensors(epoch, skip)
        batches = Prefetcher(made, self.prefetch, name=f"loader-rank{self.rank}") if self.prefetch else made
        try:
            for i, batch in enumerate(batches, skip):
                self.batches_consumed = i + 1
                yield batch
        finally:  # also when the consumer stops early: no thread left running
            if isinstance(batches, Prefetcher):
                batches.close()
        self.epoch, self.batches_consumed = epoch + 1, 0

    def _tensors(self, epoch: int, skip: int) -> Iterator[Batch]:
        for i, (user, inp, tgt) in enumerate(self._epoch_batches(epoch)):
            if i < skip:
                continue  # replaying up to the restored position: no tensors built
            batch = {
                "input_ids": torch.from_numpy(inp),  # (B, L)
                "targets": torch.from_numpy(tgt),  # (B, L)
                "user_ids": torch.from_numpy(user),  # (B,)
            }
            yield {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

    def _epoch_batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        plan = self._plan()
        if plan is None:
            yield from self._stream(epoch, self.shard, self.rank)
            return
        for world, rank, start, stop in plan:
            shard = RowShard(self.files, rank, world)
            for i, arrays in enumerate(self._stream(epoch, shard, rank)):
                if i >= stop:
                    break
                if i >= start:
                    yield arrays

    def _stream(self, epoch: int, shard: RowShard, rank: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Rank `rank`'s batches of `epoch` over `shard`: (user (B,), input ids (B, L), targets (B, L))."""
        rng = np.random.default_rng([self.seed, epoch, rank])
        pending: list = []  # window arrays not yet shuffled
        carry = None  # (user, inp, tgt) left over from the last buffer, fewer than B windows
        n_pending = 0
        for user, off, items in self._rows(epoch, shard):
            pending.append(cut_windows(user, off, items, self.seq_len))
            n_pending += len(pending[-1][0])
            if n_pending >= self.shuffle_buffer:
                carry = yield from self._emit(pending, carry, rng, final=False)
                pending, n_pending = [], 0
        yield from self._emit(pending, carry, rng, final=True)

    def _emit(self, pending: list, carry, rng: np.random.Generator, final: bool):
        parts = ([carry] if carry is not None else []) + pending
        if not parts:
            return None
        user, inp, tgt = (np.concatenate([p[i] for p in parts]) for i in range(3))
        perm = rng.permutation(len(user))
        user, inp, tgt = user[perm], inp[perm], tgt[perm]
        B = self.batch_size
        full = len(user) // B * B
        for a in range(0, full, B):
            yield user[a : a + B], inp[a : a + B], tgt[a : a + B]
        rest = (user[full:], inp[full:], tgt[full:])
        if final:
            if len(rest[0]) and not self.drop_last:
                yield rest
            return None
        return rest

    def _rows(self, epoch: int, shard: RowShard) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(user (R,), offsets (R+1,), flat items) batches of the shard's sequence rows, in this epoch's order."""
        for table in self._tables(epoch, shard):
            if table.num_rows:
                off, items = list_parts(table.column("item_ids"))
                yield table.column(USER).to_numpy(), off, items

    def _tables(self, epoch: int, shard: RowShard) -> Iterator[pa.Table]:
        return shard.iter_tables([USER, "item_ids"], self.read_rows, order_seed=(self.seed, epoch))


def remaining_segments(state: dict, stream_batches: Callable[[int, int], int]) -> list[Segment]:
    """What one rank's saved state leaves of its epoch, as segments. `stream_batches(world, rank)`: the batch
    count of a stream (asked only for a rank that was on its own stream)."""
    plan = state.get("plan")
    if plan is not None and int(plan["epoch"]) == int(state["epoch"]):
        segments = [tuple(map(int, s)) for s in plan["segments"]]
    else:
        world, rank = int(state.get("world_size", 1)), int(state.get("rank", 0))
        segments = [(world, rank, 0, stream_batches(world, rank))]
    skip, out = int(state["batches_consumed"]), []
    for world, rank, start, stop in segments:
        taken = min(skip, stop - start)
        skip -= taken
        if start + taken < stop:
            out.append((world, rank, start + taken, stop))
    return out


def reshard_state(states: Sequence[dict], world_size: int, rank: int,
                  stream_batches: Callable[[int, int], int]) -> dict:
    """The state of rank `rank` of `world_size` that continues the epoch the old ranks' `states` (in rank
    order) were in: its contiguous share of their remaining batches (module docstring)."""
    epochs = {int(s["epoch"]) for s in states}
    if len(epochs) != 1:
        raise ValueError(f"the saved ranks are at different epochs {sorted(epochs)}")
    epoch = epochs.pop()
    base = {"epoch": epoch, "batches_consumed": 0, "seed": states[0].get("seed"), "world_size": world_size,
            "rank": rank, "plan": None}
    if all(int(s["batches_consumed"]) == 0 and s.get("plan") is None for s in states):
        return base  # at an epoch boundary: the new world's own streams
    left = [seg for s in states for seg in remaining_segments(s, stream_batches)]
    total = sum(stop - start for _, _, start, stop in left)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    mine, pos = [], 0  # pos: index of the segment's first batch among all remaining ones
    for world, old_rank, start, stop in left:
        a, b = max(lo, pos), min(hi, pos + stop - start)
        if a < b:
            mine.append([world, old_rank, start + a - pos, start + b - pos])
        pos += stop - start
    return {**base, "plan": {"epoch": epoch, "segments": mine}}


def make_loader(source: Union[str, os.PathLike], *, seq_len: int, batch_size: int, seed: int,
                shuffle_buffer: int = 8192, rank: int = 0, world_size: int = 1,
                drop_last: bool = False, prefetch: int = 0, pin_memory: bool = False) -> WindowLoader:
    """The trainer's entry point (keyword names match the config: model.max_seq_len, training.batch_size...)."""
    return WindowLoader(source, seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle_buffer=shuffle_buffer,
                        rank=rank, world_size=world_size, drop_last=drop_last, prefetch=prefetch,
                        pin_memory=pin_memory)
