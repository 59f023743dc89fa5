"""Export a trained model as a self-contained model directory (trainer/serving/model_dir.py), in one process.

    python -m trainer.export RUN_DIR --out MODEL_DIR            # the run's latest checkpoint
    python -m trainer.export CHECKPOINT_DIR --out MODEL_DIR     # one checkpoint (OUT/ray/train/checkpoint_...)
    python -m trainer.export CHECKPOINT_DIR --config configs/x.yaml [key=value ...] --out MODEL_DIR

The config comes from the run's results.json (RUN_DIR, or the run that holds CHECKPOINT_DIR), or from
--config and overrides when the run never finished. The vocabulary and the item counts come from the run's
data directory. The checkpoint is verified (manifests, config fingerprint) before anything is read. The
table is read whole from its torch.distributed.checkpoint files (any sharding: the reader reassembles the
shards by their offsets; no process group); the dense tower from DeepSpeed's model-states file, which under
ZeRO 0, 1 and 2 holds the whole module as the engine computed with it (ZeRO partitions only optimizer
state and gradients there), widened to fp32 for a bf16 run. A run with model selection (a validation split)
ends with the selected weights, which only the end-of-run export (`output.export_model=true`, OUT/model)
holds; a checkpoint holds its own step's weights.

A user error (a path that is no run or checkpoint, a corrupt checkpoint, a bad config) prints one `error:`
line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from data.prepare import COUNTS_FILE, PreparedData, load_item_counts
from data.vocab import Vocabulary
from model.losses import item_vectors
from trainer.checkpoint import check_compatible, latest_checkpoint, read_meta, verify
from trainer.config import Config, from_dict, load_config
from trainer.errors import USER_ERRORS, UserError, one_line
from trainer.serving import model_dir as md

if TYPE_CHECKING:
    from trainer.worker.stack import Stack

RESULTS = "results.json"
DENSE_STATES = Path("dense") / "dense" / "mp_rank_00_model_states.pt"  # DeepSpeed, tag "dense", one mp rank


# ---------------------------------------------------------------- what the run tells us


def _run_of(ckpt: Path) -> Optional[Path]:
    """The run directory (OUT) that holds a checkpoint: the nearest parent with results.json or data/."""
    for parent in ckpt.resolve().parents:
        if (parent / RESULTS).is_file() or (parent / "data" / COUNTS_FILE).is_file():
            return parent
    return None


def resolve(source: str, config: Optional[str], overrides: Sequence[str]) -> tuple[Path, Config, dict[str, Any]]:
    """(checkpoint, config, the run's data paths) for a run directory or a checkpoint directory."""
    path = Path(source)
    if not path.is_dir():
        raise UserError(f"{source}: no such run or checkpoint directory")
    if (path / "meta.json").is_file():
        ckpt, run = path, _run_of(path)
        results = _results(run) if run is not None else None
    else:
        run = path
        results = _results(run)
        named = results.get("checkpoint") if results else None
        ckpt = Path(named) if named else latest_checkpoint(run / "ray" / "train")
        if ckpt is None or not Path(ckpt).is_dir():
            raise UserError(f"{source}: neither a checkpoint (no meta.json) nor a run with a local checkpoint")
        ckpt = Path(ckpt)
    if config is not None:
        cfg = load_config(config, overrides)
    elif results is not None:
        cfg = from_dict(Config, results["config"])
    else:
        raise UserError(f"{source}: no results.json of its run to take the config from; pass --config")
    data = dict(results["data"]) if results is not None else {}
    if not data and run is not None:  # an unfinished run: its data directory by the trainer's layout
        vocab = run / "data" / "vocab"
        data = {"vocab": str(vocab) if (vocab / "vocab.json").is_file() else None,
                "item_counts": str(run / "data" / COUNTS_FILE), "eval_queries": str(run / "data" / "eval")}
    if not data.get("item_counts") or not Path(data["item_counts"]).is_file():
        raise UserError(f"{source}: the run's item counts ({data.get('item_counts')}) are missing")
    return ckpt, cfg, data


def _results(run: Path) -> Optional[dict[str, Any]]:
    f = run / RESULTS
    return json.loads(f.read_text()) if f.is_file() else None


def _raw_ids(vocab_dir: Optional[str], num_items: int):
    """Raw ids of rows 1..N from the vocabulary (None for dense ids)."""
    if not vocab_dir:
        return None
    return Vocabulary.load(vocab_dir).raw_items(np.arange(1, num_items + 1))


def _meta(cfg: Config, data: dict[str, Any], raw_ids, source: dict[str, Any]) -> md.ModelMeta:
    return md.ModelMeta(
        model=cfg.model, num_items=cfg.model.num_items, raw_id_type=md.raw_id_type(raw_ids),
        source={**source, "precision": cfg.distributed.precision, "zero_stage": cfg.distributed.zero_stage,
                "world_size": cfg.distributed.num_workers},
        eval={"ks": list(cfg.eval.ks), "exclude_seen": cfg.eval.exclude_seen, "batch_size": cfg.eval.batch_size,
              "queries": data.get("eval_queries")},
    )


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / md.CONFIG).is_file():
        raise UserError(f"{out}: exists and is not a model directory; refusing to overwrite it")


def _fresh(out: Path) -> None:
    """An empty `out`; an earlier model directory there is replaced."""
    _check_out(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- from a checkpoint


def read_table(ckpt: Path, num_items: int, dim: int) -> torch.Tensor:
    """The whole table (N + 1, D) fp32 from the checkpoint's DCP files, in this process."""
    weight = torch.empty(num_items + 1, dim)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"weight": weight}, checkpoint_id=str(ckpt / "table"), no_dist=True)
    return weight


def read_dense(ckpt: Path) -> dict[str, torch.Tensor]:
    """The dense tower's state dict from DeepSpeed's model-states file (ZeRO 0-2: the whole module)."""
    states = torch.load(ckpt / DENSE_STATES, map_location="cpu", weights_only=False)
    return states["module"]


def export_checkpoint(ckpt: Path, cfg: Config, data: dict[str, Any], out: Path, onnx: bool = True) -> Path:
    meta = read_meta(ckpt)
    verify(ckpt, meta["world_size"])
    check_compatible(ckpt, cfg, meta, data.get("vocab_sha256"))  # the run's own vocabulary
    m = cfg.model
    table = read_table(ckpt, m.num_items, m.dim)
    raw_ids = _raw_ids(data.get("vocab"), m.num_items)
    _fresh(out)
    rows = np.arange(1, m.num_items + 1)
    items = item_vectors(cfg.training.loss, table[1:])  # ranked as trained (normalised under loss.normalize)
    md.write_items(out, 0, rows, items.numpy(), load_item_counts(data["item_counts"], m.num_items)[1:], raw_ids)
    md.write_dense(out, read_dense(ckpt))
    source = {"kind": "checkpoint", "path": str(ckpt.resolve()), "step": meta["step"], "epoch": meta["epoch"]}
    md.write_meta(out, _meta(cfg, data, raw_ids, source), data.get("vocab"))
    if onnx:
        from trainer.serving.onnx_export import export_onnx

        export_onnx(md.load(out))
    return out


# ---------------------------------------------------------------- at the end of a run (in the workers)


def export_from_stack(stack: "Stack", cfg: Config, data: PreparedData, rank: int, step: int) -> Path:
    """OUT/model from the live stack (collective): every rank writes its own full-width rows, rank 0 the
    dense tower and, after a barrier, config.json. No rank gathers the table."""
    out = Path(cfg.output.dir).resolve() / "model"
    start, weight = stack.table.row_block()  # collective: (n, D) rows start..start+n-1
    weight = item_vectors(cfg.training.loss, weight.float())
    _check_out(out)  # on every rank (output.dir is shared), so none is left waiting at the barrier
    if rank == 0:
        _fresh(out)
    dist.barrier()
    m = cfg.model
    rows = np.arange(start, start + weight.shape[0])
    keep = rows != 0  # row 0 is padding
    raw_all = _raw_ids(data.vocab, m.num_items)
    raw = raw_all.take(rows[keep] - 1) if raw_all is not None else None
    counts = data.load_item_counts(m.num_items)
    md.write_items(out, rank, rows[keep], weight.float().cpu().numpy()[keep], counts[rows[keep]], raw)
    dist.barrier()
    if rank == 0:
        md.write_dense(out, stack.engine.module.state_dict())
        source = {"kind": "run_end", "path": str(Path(cfg.output.dir).resolve()), "step": step}
        md.write_meta(out, _meta(cfg, data.to_dict(), raw_all, source), data.vocab)
    dist.barrier()
    return out


# ---------------------------------------------------------------- command line


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="convformer-export", description=__doc__.splitlines()[0])
    p.add_argument("source", help="a run directory (output.dir) or a checkpoint directory")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--config", help="the run's config, when its results.json is missing")
    p.add_argument("--no-onnx", action="store_true", help="skip user_tower.onnx")
    p.add_argument("overrides", nargs="*", help="section.key=value, with --config")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        ckpt, cfg, data = resolve(args.source, args.config, args.overrides)
        out = export_checkpoint(ckpt, cfg, data, Path(args.out), onnx=not args.no_onnx)
    except USER_ERRORS as e:
        print(one_line(e), file=sys.stderr, flush=True)
        return 2
    print(f"model directory {out} written from {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
