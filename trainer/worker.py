"""One Ray Train worker. `Trainer.__init__` builds the stack in one fixed order:

1. process group (created by Ray Train) -> DistContext: world size, ranks, device
2. the model, single-device: SequenceEncoder (dense tower) from model/
3. the item table: a TorchRec EmbeddingCollection sharded by DistributedModelParallel, with the
   sparse optimizer fused into its backward
4. DeepSpeed over the dense tower only (never over the TorchRec module: stack.md)
5. this worker's share of the training sequences (a fixed row range of the Parquet files)
6. the checkpointer, restoring when Ray Train hands back a checkpoint

then `train()` and `evaluate()`.
"""

import os
import resource
import signal
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
from data.sequences import sequence_files
from data.shards import RowShard
from model.convformer import SequenceEncoder, last_hidden
from model.losses import NegativeSampler, loss_from_embeddings, sample_loss_ids
from trainer.checkpoint import Checkpointer
from trainer.config import Config, from_dict
from trainer.embeddings import ShardedItemTable
from trainer.evaluate import EmbeddingScorer, EvalBatch, evaluate, lockstep
from trainer.parallel import DistContext, engine_dtype, wrap_dense
from trainer.prepare import PreparedData
from trainer.queries import query_tensors


class NonFiniteLoss(RuntimeError):
    pass


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    cfg = from_dict(Config, loop_config["config"])
    data = PreparedData.from_dict(loop_config["data"])
    return Trainer(cfg, data).run()


def train_step(cfg: Config, table: ShardedItemTable, engine, sampler: NegativeSampler, gen: torch.Generator,
               batch: dict[str, torch.Tensor], device: torch.device, poison: bool = False) -> tuple[torch.Tensor, int]:
    """Lookup, dense forward, loss, backward (with the fused sparse update), dense step.

    When any rank's loss is not finite, no rank runs the backward or the step (they are collectives,
    and the update would poison both towers); the caller decides to stop or to skip. `poison` makes
    this rank's loss NaN (fault injection for tests).
    """
    ids = batch["input_ids"].to(device)  # (B, L)
    targets = batch["targets"].to(device)  # (B, L)
    loss_ids = sample_loss_ids(cfg.training.loss, targets, sampler, cfg.training.positions, gen)
    # One lookup (one all-to-all each way) for the inputs, positives and negatives together.
    emb = table.lookup(torch.cat([ids.reshape(-1), loss_ids.all]))  # (B*L + N + M, D)
    item_emb = emb[: ids.numel()].view(*ids.shape, -1).to(engine_dtype(engine))  # (B, L, D)
    hidden = engine(item_emb, ids != 0).float()  # (B, L, D)
    loss = loss_from_embeddings(cfg.training.loss, hidden, loss_ids, emb[ids.numel():], sampler)
    if poison:
        loss = loss * float("nan")
    bad = (~torch.isfinite(loss.detach())).to(torch.int32).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        return loss.detach().new_tensor(float("nan")), 0
    engine.backward(loss)  # also runs the table's fused sparse update
    engine.step()
    return loss.detach(), loss_ids.pos_ids.numel()


class Trainer:
    def __init__(self, cfg: Config, data: PreparedData) -> None:
        self.cfg, self.data = cfg, data
        self.phases: dict[str, float] = {}
        t0 = time.perf_counter()

        # 1. Process group from Ray Train. Threads match the worker's CPU share: oversubscribed
        # OpenMP threads spin against each other (30x slower steps seen on 2 cores).
        torch.set_num_threads(max(1, int(cfg.distributed.cpus_per_worker)))
        self.ctx = DistContext.from_process_group()

        # 2. Model, single-device; the same seed on every rank gives the same dense init.
        torch.manual_seed(cfg.training.seed)
        encoder = SequenceEncoder(cfg.model)

        # 3. Item table, sharded across workers (rows initialised from their global index, not the rank).
        self.table = ShardedItemTable(cfg, self.ctx)

        # 4. DeepSpeed over the dense tower.
        self.engine = wrap_dense(encoder, cfg, self.ctx)

        # 5. Data: this worker's share of the rows; negatives drawn per rank from the training-window popularity.
        self.loader = make_loader(
            data.train_sequences, seq_len=cfg.model.max_seq_len, batch_size=cfg.training.batch_size,
            seed=cfg.training.seed, shuffle_buffer=cfg.data.shuffle_buffer, rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )
        self.dtype = engine_dtype(self.engine)
        counts = torch.tensor(data.item_counts())  # a copy: Ray hands back a read-only array
        self.sampler = NegativeSampler(cfg.model.num_items, cfg.training.loss.sampler, counts)
        self.gen = torch.Generator().manual_seed(cfg.training.seed * 1000 + self.ctx.rank)

        # 6. Checkpointer; Ray Train hands back the latest checkpoint after a failure or on --resume.
        self.checkpointer = Checkpointer(cfg, self.ctx)
        self.step = 0  # the loader keeps the epoch and the position within it
        self.saved_step = -1
        self.skipped_steps = 0
        self.restored = False
        # model selection on the validation split: best score, its epoch, validations since, its weights
        self.best: dict[str, Any] = {"score": float("-inf"), "epoch": 0, "bad": 0, "metrics": None, "weights": None}
        if (ckpt := ray.train.get_checkpoint()) is not None:
            self.restored = True
            state = self.checkpointer.load(ckpt, self.table, self.engine, self.loader)
            self.step = state["step"]
            self.gen.set_state(state["generator"])
            self.best = state.get("best", self.best)
            torch.set_rng_state(state["torch_rng"])  # dropout masks continue as if never interrupted
        self.phases["build"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ training

    def train_step(self, batch: Optional[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, int]:
        """One optimizer step; `batch` None means this rank has run out of data but must still
        join the collectives. Returns the loss and the number of target events."""
        if batch is None:  # all padding: no targets, but the same collectives as a real batch
            batch = {"input_ids": torch.zeros(1, self.cfg.model.max_seq_len, dtype=torch.long)}
            batch["targets"] = batch["input_ids"]
        poison = self.cfg.training.fault_nan_at_step == self.step + 1
        return train_step(self.cfg, self.table, self.engine, self.sampler, self.gen, batch, self.ctx.device, poison)

    def train(self) -> dict[str, Any]:
        cfg = self.cfg.training
        t_start = time.perf_counter()
        events = sequences = 0
        window_loss, window_t, window_events = 0.0, time.perf_counter(), 0
        while self.loader.epoch < cfg.epochs and not self._done() and not self._patience_spent():
            self.engine.train()
            for batch in lockstep(self.loader):  # ranks hold unequal data; all join every step
                self._maybe_die()
                loss, n_events = self.train_step(batch)
                if torch.isfinite(loss):
                    window_loss += loss.item() * n_events  # dummy steps of a rank out of data weigh 0
                elif cfg.on_nonfinite_loss == "stop":
                    raise NonFiniteLoss(
                        f"non-finite loss at step {self.step + 1} (epoch {self.loader.epoch}); no update was "
                        "applied and no checkpoint written from it. Set training.on_nonfinite_loss=skip to skip "
                        "such batches"
                    )
                else:
                    self.skipped_steps += 1
                    if self.ctx.rank == 0:
                        print(f"step {self.step + 1}: non-finite loss, batch skipped", flush=True)
                self.step += 1
                events += n_events
                window_events += n_events
                sequences += 0 if batch is None else int(batch["input_ids"].shape[0])
                if self.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    ray.train.report(self._progress(window_loss, window_events, now - window_t))
                    window_loss, window_t, window_events = 0.0, now, 0
                if self.cfg.output.checkpoint_every and self.step % self.cfg.output.checkpoint_every == 0:
                    self.save()
                if self._done():
                    break
            validated = self.validate()
            if validated or self.saved_step != self.step:
                self.save()  # end of epoch (or of max_steps), with the early-stopping state
        seconds = time.perf_counter() - t_start
        self.phases["train"] = seconds
        totals = torch.tensor([events, sequences], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(totals)
        return {"events_per_s": totals[0].item() / seconds, "sequences_per_s": totals[1].item() / seconds,
                "steps": self.step, "epochs_completed": self.loader.epoch, "skipped_steps": self.skipped_steps,
                "restored_from_checkpoint": self.restored, "stopped_early": self._patience_spent()}

    def _maybe_die(self) -> None:
        """Fault injection for tests: SIGKILL this process once, at the configured step of a run that
        has not been restarted yet (Ray Train then restores the group from the latest checkpoint)."""
        f = self.cfg.training
        if (f.fault_kill_at_step == self.step + 1 and self.ctx.rank == f.fault_kill_rank and not self.restored
                and not f.fault_kill_in_save):
            # Ray's controller polls reports every 2 s; a worker dying sooner after reporting a checkpoint
            # can lose its registration (Ray then restores the one before). Wait so the test is exact.
            time.sleep(5)
            print(f"fault injection: killing rank {self.ctx.rank} (pid {os.getpid()}) before step {self.step + 1}",
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def _done(self) -> bool:
        return bool(self.cfg.training.max_steps) and self.step >= self.cfg.training.max_steps

    def _progress(self, loss_sum: float, events: int, seconds: float) -> dict[str, float]:
        """Loss per target event and events/s over all ranks since the last report."""
        totals = torch.tensor([loss_sum, events], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(totals)
        loss, rate = totals[0].item() / max(totals[1].item(), 1), totals[1].item() / seconds
        epoch = self.loader.epoch
        metrics = {"step": self.step, "epoch": epoch, "loss": loss, "events_per_s": rate}
        if self.ctx.rank == 0:
            print(f"step {self.step:>6}  epoch {epoch}  loss {loss:.4f}  {rate:,.0f} events/s", flush=True)
        return metrics

    def save(self) -> None:
        progress = {"step": self.step, "epoch": self.loader.epoch}
        state = {**progress, "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(), "best": self.best}
        f = self.cfg.training
        die = (f.fault_kill_in_save and f.fault_kill_at_step == self.step and self.ctx.rank == f.fault_kill_rank
               and not self.restored)
        self.checkpointer.save(state, self.table, self.engine, self.loader, metrics=progress, die=die)
        self.saved_step = self.step

    # ------------------------------------------------------------------ evaluation

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
            self.best = {"score": score, "epoch": self.loader.epoch, "bad": 0, "metrics": metrics,
                         "weights": self._snapshot()}
        else:
            self.best["bad"] += 1
        if self.ctx.rank == 0:
            print(f"epoch {self.loader.epoch}  valid {e.select} {score:.4f}  best {self.best['score']:.4f} "
                  f"(epoch {self.best['epoch']})", flush=True)
        ray.train.report({"step": self.step, "epoch": self.loader.epoch, **{f"valid/{k}": v for k, v in metrics.items()}})
        return True

    def _patience_spent(self) -> bool:
        return bool(self.cfg.eval.patience) and self.best["bad"] >= self.cfg.eval.patience

    def _snapshot(self) -> dict[str, Any]:
        """This rank's weights (its table shards and the dense tower), copied to host memory."""
        return {"table": [w.detach().cpu().clone() for _, w in self.table.local_shards()],
                "dense": {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()}}

    @torch.no_grad()
    def _restore(self, weights: dict[str, Any]) -> None:
        for (_, w), saved in zip(self.table.local_shards(), weights["table"]):
            w.copy_(saved)
        self.engine.module.load_state_dict(weights["dense"])

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, queries: str, export: bool = False) -> dict[str, float]:
        """Full-catalogue ranking of a directory of queries; every rank scores its own rows."""
        t0 = time.perf_counter()
        self.engine.eval()
        scorer = EmbeddingScorer.from_table(self.table)  # collective
        shard = RowShard(sequence_files(queries), self.ctx.rank, self.ctx.world_size)
        rows = shard.iter_tables(batch_rows=self.cfg.eval.batch_size)

        users: list[tuple[np.ndarray, np.ndarray]] = []  # (user ids, representations) for export

        def batches():
            for part in lockstep(rows):
                if part is None:  # this rank is done: still join the lookup collective
                    self._encode(torch.zeros(1, self.cfg.model.max_seq_len, dtype=torch.long))
                    yield None
                    continue
                q = query_tensors(part, self.cfg.model.max_seq_len)
                user_vecs = self._encode(q["history"])  # (B, D)
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
        OUT/embeddings/{items,users}/rank{r}.parquet with columns (item_id|user_id, embedding)."""
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
        for name, (key, keys, vecs) in tables.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            flat = pa.array(vecs.astype(np.float32).reshape(-1))
            table = pa.table({key: pa.array(keys, pa.int64()),
                              "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)})
            pq.write_table(table, root / name / f"rank{self.ctx.rank}.parquet")

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        """User representations for histories (B, L) -> (B, D), through the sharded table."""
        ids = ids.to(self.ctx.device)
        hidden = self.engine(self.table.lookup(ids).to(self.dtype), ids != 0).float()  # (B, L, D)
        return last_hidden(hidden, ids != 0)

    # ------------------------------------------------------------------ the whole job

    def run(self) -> dict[str, Any]:
        throughput = self.train()
        selection = None
        if self.data.valid_queries is not None:
            if self.best["weights"] is None:  # no validation was due: validate the final weights
                self.validate(force=True)
            self._restore(self.best["weights"])
            selection = {"select": self.cfg.eval.select, "best_epoch": self.best["epoch"],
                         "metrics": self.best["metrics"], "stopped_early": self._patience_spent()}
        metrics = self.evaluate(self.data.eval_queries, export=self.cfg.output.export_embeddings)
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024], device=self.ctx.device)
        peaks = [torch.zeros_like(peak) for _ in range(self.ctx.world_size)]
        dist.all_gather(peaks, peak)
        return {
            "metrics": metrics,
            "validation": selection,
            "throughput": throughput,
            "phases_s": self.phases,
            "peak_memory_bytes_per_worker": [int(p.item()) for p in peaks],
            "world_size": self.ctx.world_size,
        }
