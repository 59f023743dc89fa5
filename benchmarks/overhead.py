"""What the distributed stack costs: the same model and batches trained by a bare single-process
PyTorch loop and by the full stack (Ray Train worker, TorchRec table with fused row-wise Adagrad,
DeepSpeed dense tower) with one worker, side by side in one run.

    python -m benchmarks.overhead --out benchmarks/results/overhead-cpu.json [--steps 60]

Both sides train on the same pre-built batches (windows cut from a synthetic log) with the same
thread count; the bare loop uses nn.Embedding(sparse=True) + Adagrad and AdamW, the same split of
optimizers as the stack. Reported: events/s (target positions per second) of each and the ratio.
"""

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

from benchmarks.results import write_result
from data import synth
from data.loader import WindowLoader
from data.sequences import build_sequences
from model.convformer import SequenceEncoder
from model.losses import NegativeSampler, loss_from_embeddings, sample_loss_ids
from trainer.config import Config, from_dict, load_config
from trainer.distributed.context import DistContext
from trainer.driver.launch import connect_ray
from trainer.worker.stack import Stack


def make_batches(cfg: Config, num_batches: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Left-padded windows from a synthetic log, as the training loader makes them."""
    with tempfile.TemporaryDirectory() as tmp:
        log = synth.generate(cfg.data.synth, Path(tmp) / "log")
        build_sequences(log, Path(tmp) / "seq", backend="arrow")
        loader = WindowLoader(str(Path(tmp) / "seq"), seq_len=cfg.model.max_seq_len,
                              batch_size=cfg.training.batch_size, seed=seed, drop_last=True)
        batches = []
        while len(batches) < num_batches:
            batches += [{k: v.clone() for k, v in b.items() if k != "user_ids"} for b in loader]
    return batches[:num_batches]


def timed(step, batches: list, warmup: int) -> float:
    """Events per second over the batches after `warmup` steps."""
    for b in batches[:warmup]:
        step(b)
    events, t0 = 0, time.perf_counter()
    for b in batches[warmup:]:
        events += step(b)
    return float(events) / (time.perf_counter() - t0)  # events: a device tensor from Stack.train_step


def bare_loop(cfg: Config, batches: list, warmup: int, threads: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.training.seed)
    encoder = SequenceEncoder(cfg.model)
    table = torch.nn.Embedding(cfg.model.num_items + 1, cfg.model.dim, sparse=True)
    dense_opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.training.lr)
    sparse_opt = torch.optim.Adagrad(table.parameters(), lr=cfg.training.sparse_lr)
    sampler = NegativeSampler(cfg.model.num_items)
    gen = torch.Generator().manual_seed(0)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, targets = batch["input_ids"], batch["targets"]
        loss_ids = sample_loss_ids(cfg.training.loss, targets, sampler, cfg.training.positions, gen)
        emb = table(torch.cat([ids.reshape(-1), loss_ids.all]))
        hidden = encoder(emb[: ids.numel()].view(*ids.shape, -1), ids != 0)
        loss = loss_from_embeddings(cfg.training.loss, hidden, loss_ids, emb[ids.numel():], sampler)
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.training.grad_clip)
        dense_opt.step()
        sparse_opt.step()
        return loss_ids.events

    return timed(step, batches, warmup)


def stack_worker(config: dict[str, Any]) -> dict[str, float]:
    """Inside a Ray Train worker: the trainer's own Stack and its train_step."""
    torch.set_num_threads(config["threads"])
    cfg = from_dict(Config, config["config"])
    stack = Stack(cfg, DistContext.from_process_group())
    gen = torch.Generator().manual_seed(0)
    rate = timed(lambda b: stack.train_step(b, gen).events, config["batches"], config["warmup"])
    return {"events_per_s": rate}


def full_stack(cfg: Config, batches: list, warmup: int, threads: int) -> float:
    connect_ray(cfg)
    trainer = TorchTrainer(
        stack_worker,
        train_loop_config={"config": cfg.to_dict(), "batches": batches, "warmup": warmup, "threads": threads},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
    )
    result = trainer.fit()
    ray.shutdown()
    return result.return_value["events_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/smoke.yaml")
    p.add_argument("--out", default="benchmarks/results/overhead-cpu.json")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (one worker = one CPU)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, ["distributed.num_workers=1", "distributed.cpus_per_worker=1", *args.overrides])
    cfg.model.num_items = cfg.model.num_items or cfg.data.synth.items  # a dense synthetic log
    threads = args.threads
    batches = make_batches(cfg, args.steps + args.warmup)
    stack = full_stack(cfg, batches, args.warmup, threads)
    bare = bare_loop(cfg, batches, args.warmup, threads)
    result = {
        "benchmark": "bare single-process loop vs full stack (Ray Train + TorchRec + DeepSpeed), 1 worker",
        "config": args.config, "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup,
        "threads": threads, "batch_size": cfg.training.batch_size, "seq_len": cfg.model.max_seq_len,
        "bare_events_per_s": round(bare), "stack_events_per_s": round(stack), "stack_over_bare": round(stack / bare, 3),
        "target": ">= 0.8",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
