"""Top-k items for one history of raw item ids, from a model directory (trainer/serving/model_dir.py).

    python -m trainer.recommend MODEL_DIR --history "sku-17 sku-3 sku-250" [--k 10] [--include-seen]

Prints one line per item, best first: `RAW_ID<TAB>SCORE` (the dot product of the user vector with the item's
embedding). Seen items are excluded unless --include-seen. Unknown raw ids are skipped, listed in a note on
stderr; a history with no known item gets the k most popular items of the training window (score: its
count), with a note. Items come from the exact FAISS inner-product index. A bad MODEL_DIR prints one
`error:` line and exits 2. Needs torch, pyarrow, numpy and faiss; no Ray, TorchRec or DeepSpeed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from trainer.serving.errors import ModelDirError
from trainer.serving.index import build_index, search
from trainer.serving.model_dir import ServingModel, load


@dataclass
class Recommendation:
    raw_ids: list[Any]
    scores: list[float]
    unknown: list[str]  # history tokens that are not in the vocabulary (skipped)
    popular: bool  # the history had no known item: the most popular items


class Recommender:
    """A loaded model and its exact index, answering one history at a time."""

    def __init__(self, model: ServingModel, index=None) -> None:
        self.model = model
        self.index = index if index is not None else build_index(model.items[1:].numpy(), "exact")
        self.popular_rows = np.argsort(-model.counts[1:], kind="stable") + 1  # (N,) most popular first

    def recommend(self, history: Sequence[str], k: int = 10, exclude_seen: bool = True) -> Recommendation:
        rows, unknown = self.model.rows_of(history)
        seen = set(rows) if exclude_seen else set()
        if not rows:
            best = [int(r) for r in self.popular_rows[:k]]
            return Recommendation(self.model.raw_of(best), [float(self.model.counts[r]) for r in best], unknown,
                                  True)
        window = rows[-self.model.meta.model.max_seq_len :]  # the last L events, as training saw them
        user = self.model.user_vectors(torch.tensor([window]))  # (1, D)
        scores, found = search(self.index, user.numpy(), min(k + len(seen), self.model.num_items))
        keep = [(int(r), float(s)) for r, s in zip(found[0], scores[0]) if r != 0 and int(r) not in seen][:k]
        return Recommendation(self.model.raw_of([r for r, _ in keep]), [s for _, s in keep], unknown, False)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="convformer-recommend", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", help="a model directory written by convformer-export or output.export_model")
    p.add_argument("--history", default="", help='raw item ids, oldest first, separated by spaces: "a b c"')
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--include-seen", action="store_true", help="allow items of the history in the results")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.k < 1:
        print(f"error: --k must be >= 1, got {args.k}", file=sys.stderr)
        return 2
    try:
        model = load(args.model_dir)
    except ModelDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rec = Recommender(model).recommend(args.history.split(), args.k, exclude_seen=not args.include_seen)
    if rec.unknown:
        print(f"note: skipped {len(rec.unknown)} unknown item id(s): {' '.join(rec.unknown)}", file=sys.stderr)
    if rec.popular:
        print(f"note: no known item in the history; the {len(rec.raw_ids)} most popular items (score: "
              "training-window events)", file=sys.stderr)
    for raw, score in zip(rec.raw_ids, rec.scores):
        print(f"{raw}\t{score:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
