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
shuffled in buffers of `shuffle_buffer` windows with a generator seeded by (seed, epoch, rank).
`state_dict()` is (epoch, batches consumed); a restored loader replays the epoch up to that point without
building tensors and then yields exactly the batches an uninterrupted loader would have.
"""

import os
from typing import Iterator, Union

import numpy as np
import pyarrow as pa
import torch

from data.schema import USER
from data.sequences import list_parts, sequence_files
from data.shards import RowShard

Batch = dict[str, torch.Tensor]


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
    ) -> None:
        if seq_len < 1 or batch_size < 1 or shuffle_buffer < 1:
            raise ValueError("seq_len, batch_size and shuffle_buffer must be >= 1")
        self.source = source
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last
        self.rank, self.world_size, self.read_rows = rank, world_size, read_rows
        self.shard = RowShard(sequence_files(source), rank, world_size)
        self.epoch = 0
        self.batches_consumed = 0

    # ------------------------------------------------------------ position

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])

    def num_batches(self) -> int:
        """Batches per epoch: the same every epoch (the order changes, the windows do not). Counted from the
        list lengths of this share's rows (one read of its item lists), without cutting any window."""
        windows = 0
        for table in self.shard.iter_tables(["item_ids"], self.read_rows):
            off, _ = list_parts(table.column("item_ids"))
            n = np.diff(off)
            windows += int(np.where(n >= 2, (n - 2) // self.seq_len + 1, 0).sum())
        full, rest = divmod(windows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    # ------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Batch]:
        epoch, skip = self.epoch, self.batches_consumed
        for i, (user, inp, tgt) in enumerate(self._epoch_arrays(epoch)):
            if i < skip:
                continue  # replaying up to the restored position: no tensors built
            self.batches_consumed = i + 1
            yield {
                "input_ids": torch.from_numpy(inp),  # (B, L)
                "targets": torch.from_numpy(tgt),  # (B, L)
                "user_ids": torch.from_numpy(user),  # (B,)
            }
        self.epoch, self.batches_consumed = epoch + 1, 0

    def _epoch_arrays(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        pending: list = []  # window arrays not yet shuffled
        carry = None  # (user, inp, tgt) left over from the last buffer, fewer than B windows
        n_pending = 0
        for user, off, items in self._rows(epoch):
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

    def _rows(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(user (R,), offsets (R+1,), flat items) batches of sequence rows, in this epoch's order."""
        for table in self._tables(epoch):
            if table.num_rows:
                off, items = list_parts(table.column("item_ids"))
                yield table.column(USER).to_numpy(), off, items

    def _tables(self, epoch: int) -> Iterator[pa.Table]:
        return self.shard.iter_tables([USER, "item_ids"], self.read_rows, order_seed=(self.seed, epoch))


def make_loader(source: Union[str, os.PathLike], *, seq_len: int, batch_size: int, seed: int,
                shuffle_buffer: int = 8192, rank: int = 0, world_size: int = 1,
                drop_last: bool = False) -> WindowLoader:
    """The trainer's entry point (keyword names match the config: model.max_seq_len, training.batch_size...)."""
    return WindowLoader(source, seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle_buffer=shuffle_buffer,
                        rank=rank, world_size=world_size, drop_last=drop_last)
