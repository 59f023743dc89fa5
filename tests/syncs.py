"""Counting host syncs: every read of a tensor's value into Python, and every op whose output size depends on
tensor values (boolean-mask indexing, nonzero), is a point where a GPU run waits for the device. On CPU they cost
nothing, so they are counted by patching torch.Tensor.

    with HostSyncs() as syncs:
        ...
    syncs.ours     # [(kind, "file:line"), ...] made from this repository's code
    syncs.others   # made inside torch / TorchRec / DeepSpeed
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch

REPO = str(Path(__file__).resolve().parent.parent)
_OURS = tuple(f"{REPO}/{d}/" for d in ("model", "trainer", "data", "cluster", "benchmarks"))

# methods that read values to the host (or size an output by them)
READS = ["item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"]


def _is_bool_index(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class HostSyncs:
    def __init__(self) -> None:
        self.ours: list[tuple[str, str]] = []
        self.others: list[tuple[str, str]] = []
        self._saved: dict[str, Callable] = {}
        self._depth = 0

    def _record(self, kind: str) -> None:
        if self._depth:  # a sync inside a counted one (e.g. tolist -> item) is the same sync
            return
        frame = sys._getframe(2)
        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        (self.ours if frame.f_code.co_filename.startswith(_OURS) else self.others).append((kind, where))

    def _wrap(self, name: str, original: Callable, check: Callable[..., bool] | None = None) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if check is None or check(*args, **kwargs):
                self._record(name)
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
        return wrapper

    def __enter__(self) -> "HostSyncs":
        for name in READS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, self._saved[name]))
        self._saved["__getitem__"] = torch.Tensor.__getitem__
        torch.Tensor.__getitem__ = self._wrap(  # type: ignore[method-assign]
            "bool-mask index", self._saved["__getitem__"], lambda _t, index: _is_bool_index(index))
        self._saved["torch.nonzero"] = torch.nonzero
        torch.nonzero = self._wrap("torch.nonzero", torch.nonzero)  # type: ignore[assignment]
        self._saved["torch.masked_select"] = torch.masked_select
        torch.masked_select = self._wrap("torch.masked_select", torch.masked_select)  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved.items():
            if name.startswith("torch."):
                setattr(torch, name[len("torch."):], original)
            else:
                setattr(torch.Tensor, name, original)
        self._saved.clear()

    def summary(self, which: str = "ours") -> dict[str, int]:
        out: dict[str, int] = {}
        for kind, where in getattr(self, which):
            key = f"{kind} @ {where.replace(REPO + '/', '')}"
            out[key] = out.get(key, 0) + 1
        return out
