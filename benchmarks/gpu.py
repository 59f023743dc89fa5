"""The GPU run of issue #14 in plain torch: mixers, the dense tower, host syncs and CUDA-vs-CPU parity.

    python -m benchmarks.gpu --out DIR [--device cuda|cpu] [--quick] [--budget-s N]

Writes DIR/gpu.json after every section, so a run cut short still leaves valid JSON. Sections, cheapest and
most telling first:
- parity: outputs and gradients of each mixer (fft, dwc, attention) and of the dense tower on `--device`
  equal the CPU's for the same weights and inputs (fp32, TF32 off), plus fft == dwc on the device;
- host_syncs: host syncs per training step (lookup stand-in, dense tower, loss, torch AdamW), counted by
  torch.cuda.set_sync_debug_mode("warn") on CUDA and by tests/syncs.py's HostSyncs on any device;
- dense_tower: forward+backward tokens/s and device peak memory of the tower + loss, fp32 / bf16 / bf16 autocast;
- mixers: one mixer layer, forward+backward (benchmarks.mixers.measure), fp32 and bf16, B=32, D=64.

Only torch and the standard library: the GPU image has no TorchRec, Ray, DeepSpeed or pyarrow, so nothing here
imports trainer/ (trainer/worker/stack.py is what the step below mirrors). Every point is bounded: by a time
limit per point, by --budget-s for the whole run, and a point that runs out of memory or time stops the longer
lengths of its series (status "oom" / "time_limit"; "budget" when the run's time is spent).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks import mixers as mixer_bench
from model.config import LossConfig, ModelConfig
from model.convformer import SequenceEncoder
from model.losses import NegativeSampler, loss_from_embeddings, sample_loss_ids
from model.mixers import build_mixer, depthwise_conv, fft_conv

REPO = Path(__file__).resolve().parent.parent
# pass when max|device - cpu| <= ATOL + RTOL * max|cpu|, tensor by tensor (fp32, TF32 off)
RTOL, ATOL = 1e-4, 1e-6
STARTUP_S = 30.0  # a mixer subprocess's python + torch + CUDA start, on top of its steps
MIN_POINT_S = 10.0  # no subprocess point starts with less of the budget left: its start alone takes seconds
NUM_ITEMS = 10_000  # the item table's rows (a plain tensor standing in for the TorchRec table)

FULL = dict(mixer_lengths=[2048, 8192, 32768], mixer_batch=32, mixer_repeats=3,
            dense_lengths=[2048, 4096, 8192, 16384, 32768], dense_tokens=1 << 16, dense_repeats=5,
            parity_length=512, parity_batch=4, sync_length=512, sync_batch=8, sync_steps=4, budget_s=480.0)
QUICK = dict(mixer_lengths=[64, 128], mixer_batch=4, mixer_repeats=1,
             dense_lengths=[64, 128], dense_tokens=512, dense_repeats=2,
             parity_length=64, parity_batch=2, sync_length=16, sync_batch=4, sync_steps=2, budget_s=60.0)


class TimeLimit(Exception):
    """A point that would run past its time limit."""


class Budget:
    """The run's deadline; sections take a share of what is left."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def set_tf32(dtype: str) -> None:
    """The trainer's policy (trainer/worker/stack.py set_tf32): fp32 runs in true fp32, bf16 runs allow TF32."""
    torch.backends.cuda.matmul.allow_tf32 = dtype != "fp32"
    torch.backends.cudnn.allow_tf32 = dtype != "fp32"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_device_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- provenance


def source_digest() -> str:
    """sha256 of the code this run measured: the device copy of the tree has no .git to name a commit."""
    h = hashlib.sha256()
    for path in sorted([*REPO.glob("model/*.py"), REPO / "benchmarks/mixers.py", REPO / "benchmarks/gpu.py"]):
        h.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def run_provenance(device: str, load_before: tuple[float, ...]) -> dict[str, Any]:
    try:  # benchmarks.results needs only torch, but runs git, which the GPU image may lack
        from benchmarks.results import provenance

        out = provenance(load_before)
    except Exception as err:
        out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
               "commit": "", "date": time.strftime("%Y-%m-%d"),
               "load_average_before": [round(x, 2) for x in load_before], "provenance_error": repr(err)}
    out["commit"] = out.get("commit") or os.environ.get("COMMIT", "")  # gpu.sh passes COMMIT through
    out["source_sha256"] = source_digest()
    out["python"] = platform.python_version()
    info: dict[str, Any] = {"type": device, "torch_cuda": torch.version.cuda}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                    total_memory_bytes=props.total_memory, cudnn=torch.backends.cudnn.version())
    out["device"] = info
    return out


# ---------------------------------------------------------------- parity


def _forward_backward(module: torch.nn.Module, x: torch.Tensor, valid: torch.Tensor,
                      grad_y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, input gradient and every parameter gradient of y = module(x, valid) under upstream grad_y."""
    x = x.clone().requires_grad_()
    y = module(x, valid)  # (B, L, D)
    y.backward(grad_y)
    out = {"output": y.detach(), "grad_input": x.grad}
    out.update({f"grad_{name}": p.grad for name, p in module.named_parameters()})
    return out


def _errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, Any]:
    tensors = {}
    for name, r in ref.items():
        err = (got[name].detach().cpu().float() - r.float()).abs().max().item()
        scale = r.abs().max().item()
        tensors[name] = {"max_abs_err": err, "ref_max_abs": scale, "rel_err": err / max(scale, 1e-30),
                         "passed": err <= ATOL + RTOL * scale}
    return {"passed": all(t["passed"] for t in tensors.values()), "tensors": tensors}


def _parity_inputs(batch: int, length: int, dim: int) -> tuple[torch.Tensor, ...]:
    """x (B, L, D) zero at padding (the encoder's guarantee), left padding on half the rows, and grad_y."""
    gen = torch.Generator().manual_seed(1)
    valid = torch.ones(batch, length, dtype=torch.bool)  # (B, L)
    valid[: batch // 2, : length // 4] = False
    x = torch.randn(batch, length, dim, generator=gen) * valid.unsqueeze(-1)  # (B, L, D)
    grad_y = torch.randn(batch, length, dim, generator=gen)  # (B, L, D)
    return x, valid, grad_y


def run_parity(device: str, length: int, batch: int, dim: int = 64) -> dict[str, Any]:
    set_tf32("fp32")
    x, valid, grad_y = _parity_inputs(batch, length, dim)
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        mixer: lambda mixer=mixer: build_mixer(ModelConfig(dim=dim, max_seq_len=length, mixer=mixer,
                                                           kernel_size=length, num_heads=2, dropout=0.0))
        for mixer in ("fft", "dwc", "attention")
    }
    builders["dense_tower"] = lambda: SequenceEncoder(ModelConfig(dim=dim, max_seq_len=length, mixer="fft",
                                                                  kernel_size=length, dropout=0.0))
    checks = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        ref_module = build()  # CPU, fp32
        dev_module = copy.deepcopy(ref_module).to(device)
        ref = _forward_backward(ref_module, x, valid, grad_y)
        got = _forward_backward(dev_module, x.to(device), valid.to(device), grad_y.to(device))
        checks[name] = _errors(got, ref)
    # the same filter by two algorithms on the device: cuFFT against cuDNN (pocketfft against oneDNN on CPU)
    torch.manual_seed(0)
    w = torch.randn(dim, length, device=device) / length**0.5  # (D, K), K = L: outputs of order 1
    b = torch.randn(dim, device=device) * 0.1  # (D,)
    xd = x.to(device)
    checks["fft_vs_dwc_on_device"] = _errors({"output": fft_conv(xd, w, b, "zero")},
                                             {"output": depthwise_conv(xd, w, b, "zero").cpu()})
    failed = [name for name, c in checks.items() if not c["passed"]]
    return {"status": "failed" if failed else "ok", "failed": failed, "rtol": RTOL, "atol": ATOL,
            "rule": "max|device - cpu| <= atol + rtol * max|cpu| per tensor", "L": length, "B": batch, "D": dim,
            "note": None if device == "cuda" else "device is cpu: compares cpu with itself (code path only)",
            "checks": checks}


# ---------------------------------------------------------------- the dense tower's step


class DenseStep:
    """One training step of the dense tower as trainer/worker/stack.py runs it, without TorchRec or DeepSpeed.

    The item table is a plain tensor; its lookups are made leaves that require grad, standing in for the
    TorchRec outputs the backward reaches (the sparse update itself is not modelled). precision: fp32;
    bf16 (the tower cast to bf16, as DeepSpeed's bf16 mode does, embeddings cast at the boundary); or
    bf16_autocast (fp32 weights, the tower's forward under torch.autocast). Loss in fp32 in every case.
    """

    def __init__(self, device: str, length: int, batch: int, precision: str = "fp32", mixer: str = "fft",
                 loss: Optional[LossConfig] = None, positions: str = "all", sampler: str = "uniform",
                 pad_rows: int = 0, dropout: float = 0.2) -> None:
        self.device, self.precision, self.positions = device, precision, positions
        self.loss_cfg = loss or LossConfig()
        torch.manual_seed(0)
        cfg = ModelConfig(num_items=NUM_ITEMS, dim=64, num_layers=2, max_seq_len=length, mixer=mixer,
                          kernel_size=length if mixer == "fft" else 3, dropout=dropout)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.encoder = SequenceEncoder(cfg).to(device=device, dtype=self.dtype).train()
        self.table = torch.randn(NUM_ITEMS + 1, cfg.dim, device=device) * cfg.init_std  # (I+1, D) fp32
        counts = torch.randint(0, 50, (NUM_ITEMS + 1,), generator=torch.Generator().manual_seed(0))
        self.sampler = NegativeSampler(NUM_ITEMS, sampler, counts, device=torch.device(device))
        self.generator = torch.Generator().manual_seed(0)  # CPU, as the trainer's
        ids = torch.randint(1, NUM_ITEMS + 1, (batch, length + 1), generator=self.generator)  # (B, L+1)
        ids[:pad_rows, : length // 4] = 0  # left padding
        self.inputs, self.targets = ids[:, :-1].to(device), ids[:, 1:].to(device)  # (B, L) each
        self.optimizer = torch.optim.AdamW(self.encoder.parameters(), lr=1e-3)

    def loss(self) -> torch.Tensor:
        loss_ids = sample_loss_ids(self.loss_cfg, self.targets, self.sampler, self.positions, self.generator)
        item_emb = self.table[self.inputs].requires_grad_()  # (B, L, D)
        loss_emb = self.table[loss_ids.all].requires_grad_()  # (R + M, D)
        autocast = torch.autocast(self.device, dtype=torch.bfloat16) if self.precision == "bf16_autocast" \
            else nullcontext()
        with autocast:
            hidden = self.encoder(item_emb.to(self.dtype), self.inputs != 0).float()  # (B, L, D)
        return loss_from_embeddings(self.loss_cfg, hidden, loss_ids, loss_emb, self.sampler)

    def forward_backward(self) -> None:
        self.loss().backward()
        self.encoder.zero_grad(set_to_none=True)

    def train_step(self) -> bool:
        loss = self.loss()
        if (~torch.isfinite(loss.detach())).item():  # the trainer's one host sync per step (stack.py)
            return False
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True


# ---------------------------------------------------------------- host syncs

SYNC_CASES = {
    "fft-uniform-all": dict(mixer="fft", loss=LossConfig(num_negatives=64)),
    "fft-uniform-all-bf16": dict(mixer="fft", loss=LossConfig(num_negatives=64), precision="bf16"),
    "attention-uniform-last": dict(mixer="attention", loss=LossConfig(num_negatives=64), positions="last"),
    "dwc-popularity-inbatch": dict(mixer="dwc", sampler="popularity",
                                   loss=LossConfig(num_negatives=64, sampler="popularity", in_batch_negatives=True)),
    "fft-bce": dict(mixer="fft", loss=LossConfig(type="bce")),
}


def _where(filename: str, lineno: int) -> str:
    return f"{filename.replace(str(REPO) + '/', '')}:{lineno}"


def _is_ours(filename: str) -> bool:
    return any(filename.startswith(f"{REPO}/{d}/") for d in ("model", "trainer", "data", "cluster", "benchmarks"))


def count_cuda_syncs(step: Callable[[], Any], steps: int) -> dict[str, Any]:
    """Synchronizing CUDA calls over `steps` steps, from torch's sync debug mode (a warning per call)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the default filter shows a warning once per line
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    found = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where: dict[str, int] = {}
    for w in found:
        where[_where(w.filename, w.lineno)] = where.get(_where(w.filename, w.lineno), 0) + 1
    ours = sum(1 for w in found if _is_ours(w.filename))
    return {"method": "torch.cuda.set_sync_debug_mode('warn'): one warning per synchronizing CUDA call",
            "total": len(found), "ours": ours, "others": len(found) - ours, "steps": steps,
            "per_step": len(found) / steps, "where": where}


def count_patched_syncs(step: Callable[[], Any], steps: int) -> dict[str, Any]:
    """Host reads over `steps` steps, from tests/syncs.py (patches torch.Tensor; sees CPU-tensor reads too)."""
    from tests.syncs import HostSyncs

    with HostSyncs() as syncs:
        for _ in range(steps):
            step()
    ours, others = syncs.summary("ours"), syncs.summary("others")
    return {"method": "tests/syncs.py HostSyncs: patched torch.Tensor reads (item, bool, .cpu(), bool-mask index, "
                      "nonzero, ...), any device; 'others' includes reads of CPU tensors inside torch (AdamW's step)",
            "total": len(syncs.ours) + len(syncs.others), "ours": len(syncs.ours), "others": len(syncs.others),
            "steps": steps, "per_step": (len(syncs.ours) + len(syncs.others)) / steps,
            "where_ours": ours, "where_others": others}


def run_host_syncs(device: str, length: int, batch: int, steps: int) -> dict[str, Any]:
    cases = {}
    for name, kw in SYNC_CASES.items():
        kw = dict(kw)
        set_tf32(kw.get("precision", "fp32"))
        dense = DenseStep(device, length, batch, pad_rows=batch // 2, **kw)
        dense.train_step()  # warm-up: first-call setup is not a step's cost
        finite: list[bool] = []

        def step() -> None:
            finite.append(dense.train_step())

        case: dict[str, Any] = {}
        if device == "cuda":
            case["cuda_sync_debug"] = count_cuda_syncs(step, steps)
        else:
            case["cuda_sync_debug"] = {"method": "torch.cuda.set_sync_debug_mode", "status": "not run: no CUDA"}
        case["patched_reads"] = count_patched_syncs(step, steps)
        case["finite"] = all(finite)
        cases[name] = case
        free_device_memory(device)
    return {"status": "ok", "what": "one training step: table lookup stand-in, dense tower, loss, the non-finite "
            "flag read (the trainer's one sync), backward, torch AdamW step", "L": length, "B": batch,
            "expected_ours_per_step": 1, "cases": cases}


# ---------------------------------------------------------------- dense tower throughput


def time_step(step: Callable[[], Any], device: str, repeats: int, limit_s: float) -> tuple[float, int]:
    """Median seconds of `step` after one warm-up, with as many repeats (>= 1) as fit in limit_s; returns
    (seconds, repeats). Raises TimeLimit when the warm-up alone leaves no room for one more."""
    t0 = time.perf_counter()
    step()
    sync(device)
    warm = time.perf_counter() - t0
    if warm * 2 > limit_s:
        raise TimeLimit(f"warm-up step took {warm:.1f} s; limit {limit_s:.0f} s for the point")
    repeats = max(1, min(repeats, int((limit_s - warm) / warm)))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), repeats


def dense_point(device: str, length: int, tokens: int, precision: str, repeats: int, limit_s: float) -> dict:
    set_tf32("fp32" if precision == "fp32" else "bf16")
    batch = max(1, tokens // length)
    free_device_memory(device)
    dense = DenseStep(device, length, batch, precision)
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    seconds, done = time_step(dense.forward_backward, device, repeats, limit_s)
    rec: dict[str, Any] = {"status": "ok", "B": batch, "seconds": seconds, "repeats": done,
                           "tokens_per_s": batch * length / seconds}
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        rec.update(peak_bytes=peak, peak_above_start_bytes=peak - base, peak_mib=round(peak / 2**20, 1))
    del dense
    free_device_memory(device)
    return rec


def run_series(points: list[tuple[str, int]], measure: Callable[[str, int, float], dict],
               growth: Callable[[str], float], limit_s: float, max_step_s: float, budget: Budget,
               min_left_s: float = 2.0) -> list[dict]:
    """Measure (series, L) points in order, each given min(limit_s, the budget left), none started with less
    than min_left_s left. A series stops at its first oom / time_limit / failure (its longer lengths get that
    status); a point whose step, predicted from the series' last one as seconds * (L / L_last) ** growth,
    exceeds max_step_s is not started."""
    stopped: dict[str, dict] = {}
    last: dict[str, tuple[int, float]] = {}
    records = []
    for series, length in points:
        rec: dict[str, Any] = {"series": series, "L": length}
        if series in stopped:
            rec.update(status=stopped[series]["status"], reason=f"not run: {stopped[series]['status']} at "
                       f"L={stopped[series]['L']}")
        elif budget.left() < min_left_s:
            rec.update(status="budget", reason="not run: the time budget is spent")
        elif series in last and _predict(last[series], length, growth(series)) > max_step_s:
            predicted = _predict(last[series], length, growth(series))
            rec.update(status="time_limit", reason=f"not run: predicted {predicted:.1f} s per step")
        else:
            try:
                rec.update(measure(series, length, min(limit_s, budget.left())))
            except TimeLimit as err:
                rec.update(status="time_limit", reason=str(err))
            except Exception as err:  # a CUDA OOM, or a real failure: both stop the series
                rec.update(status="oom" if is_oom(err) else "failed", reason=repr(err)[-500:])
        if rec["status"] == "ok":
            last[series] = (length, rec["seconds"])
        elif rec["status"] != "budget" and series not in stopped:
            stopped[series] = rec
        records.append(rec)
        print(f"  {series:>22} L={length:>6}  {_brief(rec)}", flush=True)
    return records


def _predict(last: tuple[int, float], length: int, growth: float) -> float:
    return last[1] * (length / last[0]) ** growth


def _brief(rec: dict) -> str:
    if rec["status"] != "ok":
        return f"{rec['status']}: {rec.get('reason', '')}"[:120]
    mem = f"  {rec['peak_bytes'] / 2**20:9.1f} MiB" if rec.get("peak_bytes") is not None else ""
    rate = f"  {rec['tokens_per_s']:12.0f} tok/s" if "tokens_per_s" in rec else ""
    return f"{rec['seconds'] * 1e3:10.2f} ms{rate}{mem}"


def section_status(records: list[dict]) -> str:
    states = {r["status"] for r in records}
    return "failed" if "failed" in states else "ok" if states == {"ok"} else "partial"


def run_dense(device: str, s: dict, limit_s: float, budget: Budget) -> dict[str, Any]:
    precisions = ["fp32", "bf16", "bf16_autocast"]
    points = [(p, length) for length in s["dense_lengths"] for p in precisions]  # short lengths first

    def measure(precision: str, length: int, limit: float) -> dict:
        return dense_point(device, length, s["dense_tokens"], precision, s["dense_repeats"], limit)

    # fft: ~L log L per sequence; time_step needs room for the warm-up and one timed step
    records = run_series(points, measure, lambda _: 1.2, limit_s, limit_s / 2, budget)
    records = [{"precision": r.pop("series"), **r} for r in records]
    return {"status": section_status(records),
            "what": "forward+backward of the dense tower (fft mixer, K=L, D=64, 2 layers, dropout 0.2) plus the "
                    f"sampled-softmax loss (256 negatives, every position); B = {s['dense_tokens']} tokens // L; "
                    "peak = torch.cuda.max_memory_allocated over the timed steps (reset per point)",
            "precisions": {"fp32": "fp32, TF32 off", "bf16": "tower cast to bf16 (DeepSpeed bf16, as the trainer)",
                           "bf16_autocast": "fp32 weights, forward under torch.autocast(bf16)"},
            "records": records}


# ---------------------------------------------------------------- mixers


def mixer_point(variant: str, length: int, dtype: str, args: argparse.Namespace, s: dict, limit_s: float) -> dict:
    """One benchmarks.mixers point; in a subprocess (clean peak memory, a hard time-out) or in this process."""
    if args.isolation == "inprocess":
        set_tf32(dtype)
        free_device_memory(args.device)
        t0 = time.perf_counter()
        out = mixer_bench.measure(variant, length, 64, s["mixer_batch"], args.device, dtype, s["mixer_repeats"])
        if time.perf_counter() - t0 > limit_s:
            raise TimeLimit(f"point took {time.perf_counter() - t0:.0f} s > {limit_s:.0f} s")
        return {"status": "ok", **out}
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--_mixer_point", variant, str(length), dtype,
           "--device", args.device, "--batch", str(s["mixer_batch"]), "--repeats", str(s["mixer_repeats"])]
    own_limit = limit_s * (s["mixer_repeats"] + 2) + STARTUP_S
    timeout = min(own_limit, args.budget.left())
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        cut = "" if timeout == own_limit else " (cut short by the run's --budget-s)"
        raise TimeLimit(f"timed out after {timeout:.0f} s{cut}") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        if "out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137):
            raise torch.OutOfMemoryError(tail)
        raise RuntimeError(f"exit {proc.returncode}: {tail}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["seconds"] > limit_s:
        raise TimeLimit(f"{out['seconds']:.1f} s per step > {limit_s:.0f} s")
    return {"status": "ok", **out}


def mixer_ratios(records: list[dict]) -> dict[str, dict]:
    """Per dtype and L: every other mixer's time and peak over fft's, and fft's over attention's."""
    ok = {(r["mixer"], r["dtype"], r["L"]): r for r in records if r["status"] == "ok"}
    out: dict[str, dict] = {}
    for (mixer, dtype, length), fft in ok.items():
        if mixer != "fft":
            continue
        row = {}
        for other in mixer_bench.VARIANTS:
            rec = ok.get((other, dtype, length))
            if other == "fft" or rec is None:
                continue
            row[f"{other}_over_fft_seconds"] = round(rec["seconds"] / fft["seconds"], 3)
            if fft["peak_bytes"] > 0:  # CPU points below the page granularity read 0
                row[f"{other}_over_fft_peak_bytes"] = round(rec["peak_bytes"] / fft["peak_bytes"], 3)
        if "attention_over_fft_seconds" in row:
            row["fft_over_attention_seconds"] = round(1 / row["attention_over_fft_seconds"], 3)
        out.setdefault(dtype, {})[str(length)] = row
    return out


def run_mixers(args: argparse.Namespace, s: dict, limit_s: float, budget: Budget) -> dict[str, Any]:
    # every mixer and dtype at one L before the next L: a run out of budget loses the longest lengths only
    points = [(f"{variant}/{dtype}", length) for length in s["mixer_lengths"] for dtype in ("fp32", "bf16")
              for variant in mixer_bench.VARIANTS]

    def measure(series: str, length: int, limit: float) -> dict:
        variant, dtype = series.split("/")
        return mixer_point(variant, length, dtype, args, s, limit)

    def growth(series: str) -> float:  # dwc K=L and attention grow ~L^2 per step
        return 2.0 if series.split("/")[0] in ("dwc_K=L", "attention") else 1.2

    min_left = MIN_POINT_S if args.isolation == "subprocess" else 2.0
    records = run_series(points, measure, growth, limit_s, limit_s, budget, min_left)
    records = [{"mixer": r["series"].split("/")[0], "dtype": r.pop("series").split("/")[1], **r} for r in records]
    for r in records:
        r["kernel_size"] = mixer_bench.VARIANTS[r["mixer"]][1] or r["L"]
        if r["status"] == "ok":
            r["ms"] = round(r["seconds"] * 1e3, 3)
            r["peak_mib"] = round(r["peak_bytes"] / 2**20, 1)
    return {"status": section_status(records),
            "what": f"one mixer layer (benchmarks.mixers.measure), forward+backward, B={s['mixer_batch']}, D=64, "
                    f"median of {s['mixer_repeats']}; peak = bytes above the step's start (CUDA: "
                    "max_memory_allocated; CPU: resident-set high-water mark); fp32 with TF32 off, bf16 with "
                    "TF32 allowed (the trainer's policy); the fft mixer transforms in fp32 under bf16",
            "isolation": args.isolation, "records": records, "ratios": mixer_ratios(records)}


# ---------------------------------------------------------------- driver


def write_json(result: dict, out_dir: Path) -> Path:
    """Atomically, so a run killed mid-write still leaves the last complete file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path, tmp = out_dir / "gpu.json", out_dir / "gpu.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    return path


def run_section(result: dict, name: str, fn: Callable[[], dict], out_dir: Path) -> None:
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        result[name] = fn()
    except Exception as err:
        result[name] = {"status": "failed", "error": repr(err), "traceback": traceback.format_exc()[-3000:]}
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    result[name]["seconds"] = round(time.perf_counter() - t0, 1)
    status = result["status"]
    status["sections"][name] = result[name]["status"]
    status["failed"] = [k for k, v in status["sections"].items() if v == "failed"]
    status["incomplete"] = [k for k, v in status["sections"].items() if v == "partial"]
    path = write_json(result, out_dir)
    print(f"== {name}: {result[name]['status']} in {result[name]['seconds']} s -> {path}", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results", help="directory for gpu.json")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny lengths and few repeats (a CPU test's run)")
    p.add_argument("--budget-s", type=float, help="the whole run's time (default 480, quick 60)")
    p.add_argument("--point-s", type=float, default=60.0, help="time limit of one dense-tower point")
    p.add_argument("--max-step-s", type=float, default=10.0, help="time limit of one mixer step")
    p.add_argument("--isolation", choices=["subprocess", "inprocess"],
                   help="mixer points in their own process (default on cuda: a hard time-out) or in this one "
                        "(default on cpu: faster to start, but a point in flight cannot be cut short)")
    # a mixer point's child process: benchmarks.mixers.measure, JSON on the last line
    p.add_argument("--_mixer_point", nargs=3, metavar=("VARIANT", "L", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.isolation = args.isolation or ("subprocess" if args.device == "cuda" else "inprocess")
    return args


def main() -> int:
    args = parse_args()
    if args._mixer_point:
        variant, length, dtype = args._mixer_point
        set_tf32(dtype)
        print(json.dumps(mixer_bench.measure(variant, int(length), 64, args.batch, args.device, dtype,
                                             args.repeats)))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():  # still leave a file saying so
        error = "--device cuda but torch.cuda.is_available() is False"
        write_json({"status": {"done": False, "failed": ["device"], "error": error}}, Path(args.out))
        print(error, file=sys.stderr)
        return 2
    s = dict(QUICK if args.quick else FULL)
    s["budget_s"] = args.budget_s or s["budget_s"]
    budget = args.budget = Budget(s["budget_s"])
    out_dir = Path(args.out)
    result: dict[str, Any] = {
        "benchmark": "issue #14 GPU run: parity, host syncs, dense tower, mixers (plain torch)",
        "settings": {**s, "device": args.device, "quick": args.quick, "point_s": args.point_s,
                     "max_step_s": args.max_step_s, "isolation": args.isolation},
        "provenance": run_provenance(args.device, os.getloadavg()),
        "status": {"done": False, "sections": {}, "failed": [], "incomplete": []},
    }
    write_json(result, out_dir)
    run_section(result, "parity", lambda: run_parity(args.device, s["parity_length"], s["parity_batch"]), out_dir)
    run_section(result, "host_syncs",
                lambda: run_host_syncs(args.device, s["sync_length"], s["sync_batch"], s["sync_steps"]), out_dir)
    dense_budget = Budget(0.4 * budget.left())  # the mixers get the rest
    run_section(result, "dense_tower", lambda: run_dense(args.device, s, args.point_s, dense_budget), out_dir)
    run_section(result, "mixers", lambda: run_mixers(args, s, args.max_step_s, budget), out_dir)
    result["status"]["done"] = True
    result["provenance"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"wrote {write_json(result, out_dir)}; status {json.dumps(result['status'])}", flush=True)
    return 1 if result["status"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
