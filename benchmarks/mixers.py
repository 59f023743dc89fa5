"""Forward+backward time and peak memory of one token-mixer layer, side by side.

    python -m benchmarks.mixers --out benchmarks/results/mixers-cpu.json [--quick] [--device cuda --dtype bf16]

Mixers: fft (K=L), dwc (K=L), dwc (K=30), attention; D=64, batch 32. Each (mixer, L) point runs
in its own subprocess, so a crash or a time-out loses only that point and peak memory is measured
from a clean process (CPU: the resident-set high-water mark, reset just before the step; CUDA:
max_memory_allocated). Points predicted or measured to exceed --max-seconds are skipped, and the
JSON says so.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

LENGTHS = [50, 200, 512, 1024, 2048, 4096, 8192]
QUICK_LENGTHS = [50, 200, 512]
# name -> (mixer, kernel size; None means K = L)
VARIANTS = {"fft": ("fft", None), "dwc_K=L": ("dwc", None), "dwc_K=30": ("dwc", 30), "attention": ("attention", None)}


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(variant: str, length: int, dim: int, batch: int, device: str, dtype: str, repeats: int) -> dict:
    """One point, in this process. Returns seconds (median of repeats) and peak bytes of one step."""
    import torch

    from model.config import ModelConfig
    from model.mixers import build_mixer

    torch.manual_seed(0)
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    mixer, k = VARIANTS[variant]
    cfg = ModelConfig(dim=dim, max_seq_len=length, mixer=mixer, kernel_size=k or length, num_heads=1, dropout=0.0)
    layer = build_mixer(cfg).to(device)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    layer = layer.to(torch_dtype)
    x = torch.randn(batch, length, dim, device=device, dtype=torch_dtype, requires_grad=True)  # (B, L, D)
    valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    # a fixed upstream gradient: the step is the layer's forward and backward, with no loss's passes over (B, L, D)
    grad_y = torch.randn(batch, length, dim, device=device, dtype=torch_dtype)

    def step() -> None:
        y = layer(x, valid)
        y.backward(grad_y)
        x.grad = None
        layer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (plans, allocator)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    step()
    sync()
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _rss_bytes("VmHWM")) - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "peak_bytes": max(int(peak), 0)}


def machine_rates(dim: int, batch: int, lengths: list[int]) -> dict:
    """What this CPU sustains, for the FFT path's floor: fp32 matmul FLOP/s (a peak for arithmetic), copy
    bandwidth (bytes read + written per second), and per transform length n the FFT library's in-cache real
    transforms (rfft and irfft apart, on one block as `model.mixers` blocks them; they differ about 2x here)
    and one whole (B, L, D) -> (B, D, L) transposed copy."""
    import torch

    from model.mixers import _chunks, _fast_fft_size

    def best(f, repeats: int = 7) -> float:
        f()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
        return min(out)

    a = torch.randn(2048, 2048)
    flops = 2 * 2048**3 / best(lambda: a @ a)
    big = torch.randn(64 << 20 >> 2)  # 64 MiB, copied into a buffer already touched (no page faults)
    dst = torch.empty_like(big).copy_(big)
    bandwidth = 2 * big.numel() * 4 / best(lambda: dst.copy_(big))
    transform = {}
    for length in lengths:
        n = _fast_fft_size(2 * length - 1)  # K = L, zero padding
        b, d = _chunks(batch, dim, n // 2 + 1)[0]
        rows = (b.stop - b.start) * (d.stop - d.start)
        block = torch.randn(rows, n)
        spec = torch.fft.rfft(block)
        x = torch.randn(batch, length, dim)
        xt = torch.empty(batch, dim, length)
        transform[str(length)] = {
            "n": n,
            "block_sequences": rows,
            "rfft_seconds_per_sequence": best(lambda: torch.fft.rfft(block)) / rows,
            "irfft_seconds_per_sequence": best(lambda: torch.fft.irfft(spec, n=n)) / rows,
            "transpose_seconds": best(lambda: xt.copy_(x.transpose(1, 2))),
        }
    return {"matmul_flops": flops, "copy_bytes_per_s": bandwidth, "transform": transform}


def fft_floor(length: int, dim: int, batch: int, rates: dict) -> dict:
    """The FFT mixer's floor for one forward+backward as `model.mixers` computes it: four real transforms of the
    B*D sequences at length n (forward: rfft of x, irfft of y; backward: rfft of the gradient, irfft of
    grad_x), and the bytes it must move: x, y, grad_y and grad_x (fp32), plus the kept spectrum X (complex64)
    written forward and read backward. Roofline: the larger of arithmetic at matmul speed and bytes at copy
    bandwidth. Library: the four transforms at the FFT library's in-cache speed; with transposes: plus the four
    (B, L, D) <-> (B, D, L) copies that feed them, at the measured transposed-copy speed."""
    t = rates["transform"][str(length)]
    n, seqs = t["n"], batch * dim
    flop = 4 * seqs * 2.5 * n * math.log2(n)  # a real transform ~ half a complex one's 5 n log2 n
    moved = 4 * batch * length * dim * 4 + 2 * seqs * (n // 2 + 1) * 8
    roofline = max(flop / rates["matmul_flops"], moved / rates["copy_bytes_per_s"])
    library = 2 * seqs * (t["rfft_seconds_per_sequence"] + t["irfft_seconds_per_sequence"])
    return {"n": n, "flop": flop, "bytes": moved, "roofline_seconds": roofline, "library_seconds": library,
            "library_and_transposes_seconds": library + 4 * t["transpose_seconds"]}


def run_point(variant: str, length: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.mixers", "--_point", variant, str(length)] + _shared_flags(args)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.max_seconds * (args.repeats + 2) + 30)
    except subprocess.TimeoutExpired:
        return {"status": f"skipped: over {args.max_seconds:.0f} s per step (timed out)"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        if "out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137):
            return {"status": f"skipped: out of memory ({tail})"}
        return {"status": f"failed: {tail}"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return ["--dim", str(args.dim), "--batch", str(args.batch), "--device", args.device, "--dtype", args.dtype,
            "--repeats", str(args.repeats)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=False, default="benchmarks/results/mixers-cpu.json")
    p.add_argument("--quick", action="store_true", help=f"only L in {QUICK_LENGTHS}")
    p.add_argument("--lengths", type=int, nargs="*")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--_point", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._point:  # child process: one measurement, JSON on the last line
        print(json.dumps(measure(args._point[0], int(args._point[1]), args.dim, args.batch, args.device,
                                 args.dtype, args.repeats)))
        return

    import torch

    from benchmarks.results import provenance, write_result

    load_before = os.getloadavg()
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)
    records = []
    for variant in VARIANTS:
        prev = None  # (L, seconds) of the last measured point, to predict the next
        for length in lengths:
            rec = {"mixer": variant, "L": length, "kernel_size": VARIANTS[variant][1] or length}
            if prev is not None:
                # dwc K=L and attention grow ~L^2; predict before spending a minute on it
                growth = 2 if variant in ("dwc_K=L", "attention") else 1
                predicted = prev[1] * (length / prev[0]) ** growth
                if predicted > args.max_seconds:
                    rec["status"] = f"skipped: predicted {predicted:.0f} s per step > {args.max_seconds:.0f} s"
                    records.append(rec)
                    print(f"{variant:>10} L={length:>5}  {rec['status']}", flush=True)
                    continue
            rec.update(run_point(variant, length, args))
            if rec["status"] == "ok":
                prev = (length, rec["seconds"])
                ms, mib = rec["seconds"] * 1e3, rec["peak_bytes"] / 2**20
                print(f"{variant:>10} L={length:>5}  {ms:9.1f} ms  {mib:8.1f} MiB",
                      flush=True)
            else:
                prev = (length, float("inf"))
                print(f"{variant:>10} L={length:>5}  {rec['status']}", flush=True)
            records.append(rec)

    by = {(r["mixer"], r["L"]): r for r in records if r.get("status") == "ok"}
    rates = machine_rates(args.dim, args.batch, lengths) if args.device == "cpu" else None
    ratios, floors = {}, {}
    for length in lengths:
        fft = by.get(("fft", length))
        if not fft:
            continue
        ratios[str(length)] = {
            f"{other}_over_fft_seconds": round(by[(other, length)]["seconds"] / fft["seconds"], 2)
            for other in VARIANTS if other != "fft" and (other, length) in by
        }
        if rates is not None:
            floor = fft_floor(length, args.dim, args.batch, rates)
            floor["fft_over_roofline"] = round(fft["seconds"] / floor["roofline_seconds"], 2)
            floor["fft_over_library"] = round(fft["seconds"] / floor["library_seconds"], 2)
            floor["fft_over_library_and_transposes"] = round(
                fft["seconds"] / floor["library_and_transposes_seconds"], 2)
            floors[str(length)] = floor
    result = {
        "benchmark": "one mixer layer, forward+backward",
        "settings": {"dim": args.dim, "batch": args.batch, "device": args.device, "dtype": args.dtype,
                     "repeats": args.repeats, "max_seconds": args.max_seconds},
        **provenance(load_before),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "records": records,
        "ratios": ratios,
        "machine_rates": rates,
        "fft_floor": floors,
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
