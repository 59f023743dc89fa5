"""The training loop of one Ray Train worker. `Trainer.__init__` builds the worker in one fixed order:

1. the process group (created by Ray Train) -> DistContext: world size, ranks, device
2. the model stack (trainer/worker/stack.py): dense tower, sharded item table, DeepSpeed engine, loss
3. this worker's share of the training sequences (a fixed row range of the Parquet files)
4. the checkpointer, restoring when Ray Train hands back a checkpoint, and the fault injector

then `train()` (with validation and model selection when there is a validation split) and `evaluate()`.
"""

import math
import resource
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.train
import torch
import torch.distributed as dist

from data.loader import make_loader
from data.prepare import PreparedData
from data.sequences import sequence_files
from data.shards import RowShard, rebatch
from data.vocab import Vocabulary
from model.losses import item_vectors
from trainer.config import Config, from_dict
from trainer.distributed.collectives import padded
from trainer.distributed.context import DistContext
from trainer.evaluation.queries import query_tensors
from trainer.evaluation.ranking import EmbeddingScorer, EvalBatch, evaluate
from trainer.export import export_from_stack
from trainer.logs import to_file
from trainer.worker.checkpointer import Checkpointer
from trainer.worker.faults import FaultInjector
from trainer.worker.stack import Stack, peak_device_memory
from trainer.worker.steps import StepStats, agree_epoch, epoch_batches


class NonFiniteLoss(RuntimeError):
    pass


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    cfg = from_dict(Config, loop_config["config"])
    data = PreparedData(**loop_config["data"])
    if loop_config.get("log_dir"):  # off the console: this worker's output to OUT/logs/worker-RANK.log
        to_file(Path(loop_config["log_dir"]) / f"worker-{ray.train.get_context().get_world_rank()}.log")
    return Trainer(cfg, data).run()


def patience_spent(bad: int, steps_since_best: int, patience: int, patience_steps: int) -> bool:
    """Early stopping (eval.patience, eval.patience_steps): `patience` validations in a row without
    improvement, and at least `patience_steps` optimizer steps since the best one. patience 0: never."""
    return patience > 0 and bad >= patience and steps_since_best >= patience_steps


class Trainer:
    def __init__(self, cfg: Config, data: PreparedData) -> None:
        self.cfg, self.data = cfg, data
        self.phases: dict[str, float] = {}
        t0 = time.perf_counter()

        # 1. Process group from Ray Train. Threads match the worker's CPU share: oversubscribed
        # OpenMP threads spin against each other (30x slower steps seen on 2 cores).
        torch.set_num_threads(max(1, int(cfg.distributed.cpus_per_worker)))
        self.ctx = DistContext.from_process_group()

        # 2. The model stack; negatives are drawn per rank, from the training-window popularity when asked.
        counts = data.load_item_counts(cfg.model.num_items) if cfg.training.loss.needs_counts else None
        self.stack = Stack(cfg, self.ctx, counts)
        self.gen = torch.Generator().manual_seed(cfg.training.seed * 1000 + self.ctx.rank)

        # 3. Data: this worker's share of the rows, prepared a few batches ahead in a background thread.
        self.loader = make_loader(
            data.train_sequences, seq_len=cfg.model.max_seq_len, batch_size=cfg.training.batch_size,
            seed=cfg.training.seed, shuffle_buffer=cfg.data.shuffle_buffer, rank=self.ctx.rank,
            world_size=self.ctx.world_size, prefetch=cfg.data.prefetch, pin_memory=self.ctx.device.type == "cuda",
        )

        # 4. Checkpointer; Ray Train hands back the latest checkpoint after a failure or on --resume.
        self.checkpointer = Checkpointer(cfg, self.ctx, data.vocab_sha256)
        self.step = 0  # the loader keeps the epoch and the position within it
        self.saved_step = -1
        self.skipped_steps = 0
        self.restarted = False
        self.saved_world_size: Optional[int] = None  # the world that wrote the checkpoint resumed from
        # model selection on the validation split: best score, its epoch, validations since, its weights
        self.best: dict[str, Any] = {"score": float("-inf"), "epoch": 0, "step": 0, "bad": 0, "metrics": None,
                                     "weights": None}
        if (ckpt := ray.train.get_checkpoint()) is not None:
            self.restarted = True
            state = self.checkpointer.load(ckpt, self.stack, self.loader)
            self.step = state["step"]
            self.saved_world_size = state["saved_world_size"]
            self.gen.set_state(state["generator"])
            self.best = state.get("best", self.best)
            torch.set_rng_state(state["torch_rng"])  # dropout masks continue as if never interrupted
        self.faults = FaultInjector(cfg.debug, self.ctx.rank, restarted=self.restarted)
        self.phases["build"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ training

    def train(self) -> dict[str, Any]:
        """Between logging steps a step reads the device once (the agreed non-finite flag, in
        Stack.train_step): losses and event counts stay on the device (StepStats), and the ranks agree on
        the steps of an epoch once per epoch, not per batch (trainer/worker/steps.py)."""
        cfg = self.cfg.training
        t_start = time.perf_counter()
        stats = StepStats(self.ctx.device)
        sequences = 0
        window_t = time.perf_counter()
        while self.loader.epoch < cfg.epochs and not self._done() and not self._patience_spent():
            self.stack.train()
            my_batches = self.loader.num_batches()  # counted once; a resharded epoch has its own count
            # ranks hold unequal data; all join every step: the epoch's steps are agreed once
            steps, start = agree_epoch(my_batches, self.loader.batches_consumed)
            for batch in epoch_batches(self.loader, my_batches, steps, start):
                self.faults.before_step(self.step + 1, self.stack.engine.module)
                step = self.stack.train_step(batch, self.gen)
                if not step.finite and cfg.on_nonfinite_loss == "stop":
                    raise NonFiniteLoss(
                        f"non-finite loss at step {self.step + 1} (epoch {self.loader.epoch}); no update was "
                        "applied and no checkpoint written from it. Set training.on_nonfinite_loss=skip to skip "
                        "such batches"
                    )
                if not step.finite:
                    self.skipped_steps += 1
                    if self.ctx.rank == 0:
                        print(f"step {self.step + 1}: non-finite loss, batch skipped", flush=True)
                stats.add(step)  # on the device
                self.step += 1
                sequences += 0 if batch is None else int(batch["input_ids"].shape[0])  # a host shape
                if self.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    window_loss, window_events = stats.window()  # the logging step's read of the device
                    ray.train.report(self._progress(window_loss, window_events, now - window_t))
                    window_t = now
                if self.cfg.output.checkpoint_every and self.step % self.cfg.output.checkpoint_every == 0:
                    self.save()
                if self._done():
                    break
            validated = self.validate()
            if validated or self.saved_step != self.step:
                self.save()  # end of epoch (or of max_steps), with the early-stopping state
        seconds = time.perf_counter() - t_start
        self.phases["train"] = seconds
        totals = torch.stack([stats.total_events.to(torch.float64),
                              torch.tensor(float(sequences), dtype=torch.float64, device=self.ctx.device)])
        dist.all_reduce(totals)
        events_total, sequences_total = totals.tolist()
        return {"events_per_s": events_total / seconds, "sequences_per_s": sequences_total / seconds,
                "steps": self.step, "epochs_completed": self.loader.epoch, "skipped_steps": self.skipped_steps,
                "restored_from_checkpoint": self.restarted, "restored_from_workers": self.saved_world_size,
                "events": int(events_total), "stopped_early": self._patience_spent()}

    def _done(self) -> bool:
        return bool(self.cfg.training.max_steps) and self.step >= self.cfg.training.max_steps

    def _progress(self, loss_sum: float, events: int, seconds: float) -> dict[str, float]:
        """Loss per target event and events/s over all ranks since the last report."""
        totals = torch.tensor([loss_sum, events], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(totals)
        loss, rate = totals[0].item() / max(totals[1].item(), 1), totals[1].item() / seconds
        epoch = self.loader.epoch
        metrics = {"step": self.step, "epoch": epoch, "loss": loss, "events_per_s": rate, **self.stack.learning_rates()}
        if self.ctx.rank == 0:
            print(f"step {self.step:>6}  epoch {epoch}  loss {loss:.4f}  {rate:,.0f} events/s", flush=True)
        return metrics

    def save(self) -> None:
        progress = {"step": self.step, "epoch": self.loader.epoch}
        state = {**progress, "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(), "best": self.best}
        self.checkpointer.save(state, self.stack, self.loader, metrics=progress,
                               upload_fn=self.faults.checkpoint_upload(self.step))
        self.saved_step = self.step

    # ------------------------------------------------------------------ model selection

    def validate(self, force: bool = False) -> bool:
        """At the end of every eval.every_epochs-th epoch, when there is a validation split: score it, keep
        the best weights, count validations without improvement. Returns whether it ran."""
        e = self.cfg.eval
        if self.data.valid_queries is None or (self.loader.epoch % e.every_epochs and not force):
            return False
        metrics = self.evaluate(self.data.valid_queries)
        score = metrics[e.select]
        if score > self.best["score"]:
            self.best = {"score": score, "epoch": self.loader.epoch, "step": self.step, "bad": 0, "metrics": metrics,
                         "weights": self.stack.snapshot()}
        else:
            self.best["bad"] += 1
        if self.ctx.rank == 0:
            print(f"epoch {self.loader.epoch}  valid {e.select} {score:.4f}  best {self.best['score']:.4f} "
                  f"(epoch {self.best['epoch']})", flush=True)
        valid = {f"valid/{k}": v for k, v in metrics.items()}
        ray.train.report({"step": self.step, "epoch": self.loader.epoch, **valid})
        return True

    def _patience_spent(self) -> bool:
        e = self.cfg.eval
        return patience_spent(self.best["bad"], self.step - self.best.get("step", 0), e.patience, e.patience_steps)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, queries: str, export: bool = False, progress: bool = False) -> dict[str, float]:
        """Full-catalogue ranking of a directory of queries; every rank scores its own rows. `progress`: report
        the queries ranked so far about ten times (the driver's console shows them)."""
        t0 = time.perf_counter()
        self.stack.eval()
        start, rows = self.stack.table.row_block()  # collective
        scorer = EmbeddingScorer(start, item_vectors(self.cfg.training.loss, rows.float()))  # as trained
        shard = RowShard(sequence_files(queries), self.ctx.rank, self.ctx.world_size)
        size = self.cfg.eval.batch_size
        rows = rebatch(shard.iter_tables(batch_rows=size), size)  # full batches: their count follows the rows
        # the largest rank's batch count, the same on every rank without a collective: every rank joins
        # every batch's collectives, and the progress reports
        most_batches = math.ceil(math.ceil(shard.total_rows / self.ctx.world_size) / size)
        report_every = max(1, most_batches // 10)
        done = torch.zeros((), dtype=torch.int64, device=self.ctx.device)

        users: list[tuple[np.ndarray, np.ndarray]] = []  # (user ids, representations) for export

        def report(i: int) -> None:
            if progress and i % report_every == 0:
                ranked = done.clone()
                dist.all_reduce(ranked)
                ray.train.report({"step": self.step, "epoch": self.loader.epoch, "phase": "evaluation",
                                  "eval_queries": int(ranked.item()), "eval_total": shard.total_rows})

        def batches():
            for i, part in enumerate(padded(rows, most_batches), 1):
                report(i)
                if part is None:  # this rank is done: still join the lookup collective
                    self.stack.encode(None)
                    yield None
                    continue
                done.add_(part.num_rows)
                q = query_tensors(part, self.cfg.model.max_seq_len)
                user_vecs = self.stack.encode(q["history"])  # (B, D)
                if export:
                    users.append((part.column("user_id").to_numpy(), user_vecs.cpu().numpy()))
                yield EvalBatch(user_vecs, q["targets"].to(self.ctx.device),
                                q["seen"].to(self.ctx.device), q["relevant"].to(self.ctx.device))

        metrics = evaluate(scorer, batches(), self.cfg.eval.ks, self.cfg.model.dim, self.cfg.eval.exclude_seen)
        if export:
            self.export(scorer, users)
        self.phases["eval"] = self.phases.get("eval", 0.0) + time.perf_counter() - t0
        return metrics

    def export(self, scorer: EmbeddingScorer, users: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Item embeddings (this rank's rows) and held-out-day user embeddings, as Parquet for serving:
        OUT/embeddings/{items,users}/rank{r}.parquet with columns (item_id|user_id, embedding), plus
        raw_item_id|raw_user_id (the log's own ids) when a vocabulary mapped them."""
        root = Path(self.cfg.output.dir).resolve() / "embeddings"
        ids = np.arange(scorer.start, scorer.stop)
        keep = ids != 0  # row 0 is padding
        dim = self.cfg.model.dim
        user_ids = np.concatenate([u for u, _ in users]) if users else np.zeros(0, np.int64)
        user_vecs = np.concatenate([v for _, v in users]) if users else np.zeros((0, dim), np.float32)
        tables = {
            "items": ("item_id", ids[keep], scorer.weight.cpu().numpy()[keep]),
            "users": ("user_id", user_ids, user_vecs),
        }
        vocab = Vocabulary.load(self.data.vocab) if self.data.vocab else None
        for name, (key, keys, vecs) in tables.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            flat = pa.array(vecs.astype(np.float32).reshape(-1))
            columns = {key: pa.array(keys, pa.int64())}
            if vocab is not None:
                columns["raw_" + key] = vocab.raw_items(keys) if name == "items" else vocab.raw_users(keys)
            table = pa.table({**columns, "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)})
            pq.write_table(table, root / name / f"rank{self.ctx.rank}.parquet")

    # ------------------------------------------------------------------ the whole job

    def run(self) -> dict[str, Any]:
        throughput = self.train()
        selection = None
        if self.data.valid_queries is not None:
            if self.best["weights"] is None:  # no validation was due: validate the final weights
                self.validate(force=True)
            self.stack.restore(self.best["weights"])
            selection = {"select": self.cfg.eval.select, "best_epoch": self.best["epoch"],
                         "metrics": self.best["metrics"], "stopped_early": self._patience_spent()}
        # the driver's console starts its evaluation phase here (trainer/driver/console.py)
        ray.train.report({"step": self.step, "epoch": self.loader.epoch, "phase": "evaluation"})
        metrics = self.evaluate(self.data.eval_queries, export=self.cfg.output.export_embeddings, progress=True)
        if self.cfg.output.export_model:  # OUT/model from the weights just evaluated (collective)
            export_from_stack(self.stack, self.cfg, self.data, self.ctx.rank, self.step)
        # host RSS and, on CUDA, the device's peak allocation
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                             peak_device_memory(self.ctx.device)], device=self.ctx.device)
        peaks = [torch.zeros_like(peak) for _ in range(self.ctx.world_size)]
        dist.all_gather(peaks, peak)
        device_peaks = ({"peak_device_memory_bytes_per_worker": [int(p[1].item()) for p in peaks]}
                        if self.ctx.device.type == "cuda" else {})
        return {
            "metrics": metrics,
            "validation": selection,
            "throughput": throughput,
            "phases_s": self.phases,
            "peak_memory_bytes_per_worker": [int(p[0].item()) for p in peaks],
            **device_peaks,
            "world_size": self.ctx.world_size,
        }
