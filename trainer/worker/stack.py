"""The model as every worker runs it, composed in one place and in one fixed order:

1. the dense tower, single-device (model.SequenceEncoder); the same seed on every rank gives the same init
2. the item table: a TorchRec EmbeddingCollection sharded by DistributedModelParallel, the sparse optimizer
   fused into its backward (trainer/distributed/embeddings.py)
3. DeepSpeed over the dense tower only, never over the TorchRec module (trainer/distributed/dense.py)

`Stack` owns the table lookup, the dtype policy (TorchRec embeddings are fp32; the tower computes in the
engine's dtype; losses and scores in fp32), the engine and the loss. `train_step` is the training step and
`encode` the user representation; the worker loop, the overhead benchmark and the distributed tests call
these and nothing else.

A step, in this order:
    ids  = inputs, positives and negatives of the batch             (drawn before any lookup)
    emb  = table.lookup_parts(ids)         # one all-to-all each way, fp32
    hidden = engine(emb[inputs] -> engine dtype, valid).float()    # dense tower under DeepSpeed
    loss = next-item loss from hidden and emb[positives, negatives]  (fp32)
    bad  = all-reduce(MAX) of "loss not finite", read on the host  # the step's one host sync
    engine.backward(loss)    # backprops into the TorchRec outputs: the fused optimizer updates the rows here
    engine.step()            # dense AdamW step (+ ZeRO reduction, clipping)

Host syncs. Shapes follow the batch's shape, never its content (model/losses.py, the lookup), and the loss and
the event count come back as device tensors, so nothing in the step waits for the device except one read: the
agreed non-finite flag, which must be known on the host before the backward (the backward and the step are
collectives every rank must join or skip together, and the fused sparse update happens inside the backward).
tests/test_host_syncs.py counts them.

Every lookup is a collective. A rank without data passes `None` to `train_step` or `encode` and still takes
part with an all-padding batch, so ranks holding unequal data never deadlock.
"""

from typing import Any, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist

from model.convformer import SequenceEncoder, last_hidden
from model.losses import NegativeSampler, loss_from_embeddings, sample_loss_ids
from trainer.config import Config
from trainer.distributed.context import DistContext
from trainer.distributed.dense import engine_dtype, wrap_dense
from trainer.distributed.embeddings import ShardedItemTable, fused_params

Batch = dict[str, torch.Tensor]  # input_ids (B, L), targets (B, L); 0 = padding / no target


class Step(NamedTuple):
    """What a training step returns. `loss` and `events` are device tensors: read them at logging steps only."""

    loss: torch.Tensor  # 0-d fp32: the mean loss per target event; NaN when not finite on some rank
    events: torch.Tensor  # 0-d int64: target events of this rank's batch (0 when not finite)
    finite: bool  # False: no rank updated anything (known on the host: the step's one sync)


def set_tf32(cfg: Config) -> None:
    """The TF32 policy, explicit: fp32 runs compute in true fp32 (matmuls and cuDNN convolutions, which on
    Ampere and newer would otherwise use TF32 for convolutions by default), bf16 runs allow TF32 for the fp32
    parts (loss logits, scores). A no-op on CPU, where the flags have no effect."""
    allow = cfg.distributed.precision == "bf16"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def peak_device_memory(device: torch.device) -> int:
    """Bytes of device memory the caching allocator handed out at peak on this rank (0 off CUDA)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


class Stack:
    def __init__(self, cfg: Config, ctx: DistContext, item_counts: Optional[np.ndarray] = None) -> None:
        self.cfg, self.ctx = cfg, ctx
        m = cfg.model
        set_tf32(cfg)
        # 1. Dense tower.
        torch.manual_seed(cfg.training.seed)
        encoder = SequenceEncoder(m)
        # 2. Item table, rows initialised from their global index (any world size starts equal).
        self.table = ShardedItemTable(cfg, ctx)
        # 3. DeepSpeed over the dense tower.
        self.engine = wrap_dense(encoder, cfg, ctx)
        self.dtype = engine_dtype(self.engine)
        counts = None if item_counts is None else torch.from_numpy(np.asarray(item_counts, np.int64))
        self.sampler = NegativeSampler(m.num_items, cfg.training.loss.sampler, counts, device=ctx.device)

    # ------------------------------------------------------------ training

    def loss(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Lookup, dense forward and the loss of one batch; returns (loss, number of target events), both
        device tensors."""
        t = self.cfg.training
        ids = batch["input_ids"].to(self.ctx.device, non_blocking=True)  # (B, L)
        targets = batch["targets"].to(self.ctx.device, non_blocking=True)  # (B, L)
        loss_ids = sample_loss_ids(t.loss, targets, self.sampler, t.positions, generator)
        # One lookup (one all-to-all each way) for the inputs (a sample per sequence), positives and negatives.
        item_emb, loss_emb = self.table.lookup_parts([ids, loss_ids.all])  # (B, L, D), (R + M, D)
        hidden = self.engine(item_emb.to(self.dtype), ids != 0).float()  # (B, L, D)
        loss = loss_from_embeddings(t.loss, hidden, loss_ids, loss_emb, self.sampler)
        return loss, loss_ids.events

    def train_step(self, batch: Optional[Batch], generator: torch.Generator) -> Step:
        """One optimizer step of both towers; `batch` None: this rank is out of data but joins the collectives.

        When any rank's loss is not finite, no rank runs the backward or the step (they are collectives, and
        the update would poison both towers): the loss comes back NaN with 0 events and `finite` False, and the
        caller decides to stop or to skip. Reading that agreed flag is the step's only host sync.
        """
        loss, n_events = self.loss(batch if batch is not None else self.empty_batch(), generator)
        bad = (~torch.isfinite(loss.detach())).to(torch.int32).reshape(1)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():  # the one host sync of a step
            return Step(loss.detach().new_tensor(float("nan")), torch.zeros_like(n_events), False)
        self.engine.backward(loss)  # also runs the table's fused sparse update
        self.engine.step()
        return Step(loss.detach(), n_events, True)

    def empty_batch(self) -> Batch:
        """All padding: no targets, but the same collectives as a real batch."""
        ids = torch.zeros(1, self.cfg.model.max_seq_len, dtype=torch.long)
        return {"input_ids": ids, "targets": ids}

    # ------------------------------------------------------------ inference

    def encode(self, histories: Optional[torch.Tensor]) -> torch.Tensor:
        """User representations: left-padded histories (B, L) -> (B, D) fp32, the output at the last real
        position. Collective (a lookup); None joins it with an all-padding history and returns (0, D)."""
        ids = histories if histories is not None else self.empty_batch()["input_ids"]
        ids = ids.to(self.ctx.device)
        valid = ids != 0
        hidden = self.engine(self.table.lookup(ids).to(self.dtype), valid).float()  # (B, L, D)
        users = last_hidden(hidden, valid)  # (B, D)
        return users if histories is not None else users[:0]

    def learning_rates(self) -> dict[str, float]:
        """The optimizers' current rates: the dense AdamW's (DeepSpeed's view) and the fused sparse one's (a rank
        that holds no shard, table-wise, has no sparse optimizer: the rate its shards would get)."""
        groups = self.table.dmp.fused_optimizer.param_groups
        sparse = groups[0]["lr"] if groups else fused_params(self.cfg, self.ctx.device.type)["learning_rate"]
        return {"lr/dense": float(self.engine.get_lr()[0]), "lr/sparse": float(sparse)}

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    # ------------------------------------------------------------ weights

    def snapshot(self) -> dict[str, Any]:
        """This rank's weights (its table shards and the dense tower), copied to host memory."""
        return {"table": [(s.row0, s.col0, w.detach().cpu().clone()) for s, w in self.table.local_shards()],
                "dense": {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()}}

    @torch.no_grad()
    def restore(self, weights: dict[str, Any]) -> None:
        """Weights from `snapshot`, of this rank or (table pieces of every rank) of another plan or world size."""
        pieces = weights["table"]
        if pieces and isinstance(pieces[0], torch.Tensor):  # a snapshot of this rank's shards without geometry
            pieces = [(s.row0, s.col0, w) for (s, _), w in zip(self.table.local_shards(), pieces)]
        self.table.write_pieces(pieces)
        self.engine.module.load_state_dict(weights["dense"])
