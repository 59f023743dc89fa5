"""A worker's share of a set of Parquet files: a contiguous range of rows, read as a stream.

Rank r of W reads rows [r * N // W, (r + 1) * N // W) of the files' concatenation (N rows in all,
counted from the footers): shares differ by at most one row, none is dropped, and a share is a pure
function of (files, rank, world size). That is what exact resumption needs, and why workers do not take
Ray Data's streaming_split (it hands blocks to whichever worker asks first and, with equal=True, drops
rows to even the shares).

A share is read piece by piece: a piece is the part of one row group inside the range, read in batches.
`pieces(order_seed)` visits the pieces in an order permuted by the seed (a new order each epoch, when
files hold several row groups); rows within a piece keep their order.
"""

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class Piece:
    file: str
    row_group: int
    start: int  # first row within the row group
    stop: int


class RowShard:
    def __init__(self, files: Sequence[str], rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.files = list(files)
        sizes = [(f, pq.ParquetFile(f).metadata) for f in self.files]
        groups = [(f, g, meta.row_group(g).num_rows) for f, meta in sizes for g in range(meta.num_row_groups)]
        self.total_rows = sum(n for _, _, n in groups)
        self.start = rank * self.total_rows // world_size
        self.stop = (rank + 1) * self.total_rows // world_size
        self._pieces: list[Piece] = []
        first = 0  # global index of the row group's first row
        for f, g, n in groups:
            lo, hi = max(self.start, first), min(self.stop, first + n)
            if lo < hi:
                self._pieces.append(Piece(f, g, lo - first, hi - first))
            first += n

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def pieces(self, order_seed: Optional[Sequence[int]] = None) -> list[Piece]:
        if order_seed is None:
            return list(self._pieces)
        order = np.random.default_rng(list(order_seed)).permutation(len(self._pieces))
        return [self._pieces[i] for i in order]

    def iter_tables(self, columns: Optional[list[str]] = None, batch_rows: int = 1024,
                    order_seed: Optional[Sequence[int]] = None) -> Iterator[pa.Table]:
        """This share's rows as tables of at most `batch_rows` rows."""
        for p in self.pieces(order_seed):
            pf = pq.ParquetFile(p.file)
            seen = 0  # rows of the row group already passed
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[p.row_group], columns=columns):
                lo, hi = max(p.start - seen, 0), min(p.stop - seen, batch.num_rows)
                seen += batch.num_rows
                if lo < hi:
                    yield pa.Table.from_batches([batch.slice(lo, hi - lo)])
                if seen >= p.stop:
                    break


def rebatch(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The same rows as tables of exactly `rows` rows, the last one shorter: n rows make ceil(n / rows)
    tables, whatever the sizes of the tables given (row groups end where they end)."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        pending.append(table)
        held += table.num_rows
        while held >= rows:
            whole = pa.concat_tables(pending)
            yield whole.slice(0, rows)
            rest = whole.slice(rows)
            pending, held = ([rest] if rest.num_rows else []), rest.num_rows
    if held:
        yield pa.concat_tables(pending)
