"""Training throughput and memory of the whole trainer at long sequence lengths: fft (K = L), attention and dwc
(short K) at L = 8192, 16384, 32768, one `python -m trainer.train` run per point.

    python -m benchmarks.long_sequence [--mixers fft,attention,dwc] [--L 8192,16384,32768] [--steps 4]
        [--dwc-kernel 64] [--batch-size 2] [--timeout-s 1200] [--mem-budget-gib 18]
        [--out benchmarks/results/long-sequence-cpu.json] [--work DIR]

Every point trains on one synthetic log generated once (`--users` users of exactly 1.5 x max(L) events, so every
user fills a window at the largest L), D=64, 2 layers, `--batch-size` sequences per step, 1 worker, activation
checkpointing on, dropout 0 (with dropout, torch's CPU scaled_dot_product_attention leaves its fused kernel
for the math one, which holds the L x L scores: 12x slower and 10x the memory at L=8192 here; `--dropout`),
`training.max_steps=--steps`; evaluation is kept cheap (one query per user, k=10, no
popularity or oracle baseline). Each point runs in its own process group under two guards: a wall-clock limit
(status `timeout`) and a memory budget on the anonymous RSS of the whole process tree (the driver, Ray and the
worker; watched with psutil, status `oom` when it passes `--mem-budget-gib`). A run killed by the kernel (rc
-9 / 137) or whose log shows a MemoryError or an out-of-memory error is `oom` too; anything else that fails is
`failed` (its log is kept under --work). After a mixer's first failure its longer points are skipped: they
would fail as well.

The JSON (written again after every point): provenance (benchmarks/results.py), the settings, `records`, one
record per run point with exactly `mixer`, `L`, `status`, `events_per_s` (training events/s from the run's
results.json, over all `--steps` steps, the first included), `peak_rss_bytes_per_worker` (the largest worker's
peak RSS, ru_maxrss, from results.json), `activation_checkpointing`; and `skipped`, the points not run.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.results import provenance, write_result
from cluster.scaling import kill_group

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = "benchmarks/results/long-sequence-cpu.json"
OOM_SIGNS = ("OutOfMemoryError", "out of memory", "MemoryError", "Cannot allocate memory", "std::bad_alloc")
MIXERS = ("fft", "attention", "dwc")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in MIXERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mixer {bad[0]!r}; choose from {', '.join(MIXERS)}")
    return names


def make_log(work: Path, max_len: int, users: int) -> Path:
    """One dense synthetic log for every point: every user has exactly 1.5 x max_len events (3/4 of them before
    the held-out day, so a full training window at the largest L), 4 days."""
    from data.config import SynthConfig
    from data.synth import generate

    log = work / "log"
    if not (log / "_synth.json").is_file():
        shutil.rmtree(log, ignore_errors=True)
        cfg = SynthConfig(users=users, items=1000, days=4, seed=0, events_per_user=float(max(2, -(-3 * max_len // 2))),
                          events_sigma=0.0, workers=1)
        generate(cfg, log)
    return log


def overrides(a: argparse.Namespace, log: Path, mixer: str, length: int) -> list[str]:
    kernel = length if mixer == "fft" else min(a.dwc_kernel, length) if mixer == "dwc" else min(64, length)
    return [
        f"data.path={log}", "data.backend=arrow",
        f"model.mixer={mixer}", f"model.max_seq_len={length}", f"model.kernel_size={kernel}",
        "model.dim=64", "model.num_layers=2", "model.num_heads=2", "model.padding=zero", f"model.dropout={a.dropout}",
        f"training.batch_size={a.batch_size}", f"training.max_steps={a.steps}", "training.epochs=1000",
        "training.positions=all", f"training.log_every={max(1, a.steps)}",
        "training.loss.type=sampled_softmax", "training.loss.num_negatives=256", "training.loss.sampler=uniform",
        "training.loss.in_batch_negatives=false",
        "distributed.num_workers=1", f"distributed.cpus_per_worker={a.cpus_per_worker}",
        f"distributed.precision={a.precision}", "distributed.activation_checkpointing=true",
        "distributed.zero_stage=0",
        "eval.ks=[10]", f"eval.batch_size={a.batch_size}", "eval.popularity_baseline=false", "eval.oracle=false",
        "output.tensorboard=false",
    ]


class TreeWatch(threading.Thread):
    """Polls the anonymous RSS (RssAnon: rss - shared, so Ray's shared-memory object store and mapped libraries
    count once, i.e. not) summed over a process and all its descendants; calls `on_budget` once past `budget`."""

    def __init__(self, pid: int, budget: int, on_budget, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.budget, self.on_budget, self.every_s = pid, budget, on_budget, every_s
        self.peak, self.tripped, self.seen = 0, False, {}
        self._halt = threading.Event()

    def tree(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def run(self) -> None:
        import psutil

        while not self._halt.is_set():
            total = 0
            for p in self.tree():
                try:
                    m = p.memory_info()
                    total += max(0, m.rss - getattr(m, "shared", 0))
                    self.seen[p.pid] = p  # remembered so that what is left can be killed at the end
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            if total > self.budget and not self.tripped:
                self.tripped = True
                self.on_budget(total)
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()


def _kill(proc: subprocess.Popen, watch: Optional[TreeWatch]) -> None:
    """SIGTERM, then SIGKILL, the point's process group; then any descendant that left the group (seen by the
    watcher: only processes this point started)."""
    kill_group(proc)
    if watch is not None:
        import psutil

        for p in watch.seen.values():
            try:
                if p.is_running():
                    p.kill()
            except psutil.Error:
                pass


def run_point(a: argparse.Namespace, log: Path, mixer: str, length: int, work: Path) -> dict[str, Any]:
    point = work / f"{mixer}-L{length}"
    shutil.rmtree(point, ignore_errors=True)
    point.mkdir(parents=True)
    run_dir = point / "run"
    cmd = [sys.executable, "-m", "trainer.train", "--config", "configs/smoke.yaml",
           *overrides(a, log, mixer, length), f"output.dir={run_dir}"]
    budget = int(a.mem_budget_gib * 2**30)
    status = None
    t0 = time.perf_counter()
    with open(point / "log.txt", "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        watch = None
        try:
            import psutil  # noqa: F401
        except ImportError:
            print("psutil is not installed: no memory budget is enforced", flush=True)
        else:
            def over(total: int) -> None:
                print(f"  {mixer} L={length}: {total / 2**30:.2f} GiB > budget {a.mem_budget_gib:g} GiB, killed",
                      flush=True)
                try:  # at once: memory is short
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

            watch = TreeWatch(proc.pid, budget, over)
            watch.start()
        try:
            rc = proc.wait(timeout=a.timeout_s)
        except subprocess.TimeoutExpired:
            status = "timeout"
            _kill(proc, watch)
            rc = proc.returncode
        if watch is not None:
            watch.stop()
            watch.join()
            _kill(proc, watch)  # nothing should be left; make sure
            if watch.tripped:
                status = "oom"
    wall = time.perf_counter() - t0
    tail = (point / "log.txt").read_text(errors="replace")[-20000:]
    record: dict[str, Any] = {"mixer": mixer, "L": length, "status": status, "events_per_s": None,
                              "peak_rss_bytes_per_worker": None, "activation_checkpointing": True}
    results = run_dir / "results.json"
    if status is None:
        if rc == 0 and results.is_file():
            res = json.loads(results.read_text())
            record.update(status="ok", events_per_s=round(float(res["throughput"]["events_per_s"]), 1),
                          peak_rss_bytes_per_worker=int(max(res["peak_memory_bytes_per_worker"])),
                          activation_checkpointing=bool(res["config"]["distributed"]["activation_checkpointing"]))
        elif rc in (-signal.SIGKILL, 137) or any(s in tail for s in OOM_SIGNS):
            record["status"] = "oom"
        else:
            record["status"] = "failed"
    peak = f", tree peak {watch.peak / 2**30:.2f} GiB" if watch is not None else ""
    print(f"  {mixer} L={length}: {record['status']} in {wall:.0f} s (rc {rc}{peak})", flush=True)
    if record["status"] == "ok":
        shutil.rmtree(point, ignore_errors=True)  # keep the logs of failed points only
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        lines = [ln for ln in tail.splitlines() if "Error" in ln or "error" in ln]
        print(f"    log: {point / 'log.txt'}" + (f"; {lines[-1][:300]}" if lines else ""), flush=True)
    return record


def _write_quietly(result: dict[str, Any], out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixers", type=_names, default=list(MIXERS), help="comma separated: fft,attention,dwc")
    p.add_argument("--L", type=_ints, default=[8192, 16384, 32768], help="sequence lengths, comma separated")
    p.add_argument("--steps", type=int, default=4, help="training steps per point (training.max_steps)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per step")
    p.add_argument("--dwc-kernel", type=int, default=64, help="K of the dwc points (fft has K = L)")
    p.add_argument("--users", type=int, default=4, help="users of the synthetic log (= evaluation queries)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="the worker's Ray CPUs and torch threads")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="model.dropout; above 0, torch's CPU attention leaves its fused kernel for one with L^2 memory")
    p.add_argument("--timeout-s", type=float, default=1200.0, help="wall-clock limit per point")
    p.add_argument("--mem-budget-gib", type=float, default=18.0, help="anonymous RSS of a point's process tree")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--work", default=None, help="log and failed points' logs (default: a new temporary directory)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1 or a.users < 1 or not a.L or min(a.L) < 2:
        p.error("--steps, --batch-size and --users must be >= 1 and every --L >= 2")
    load_before = os.getloadavg()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="long-sequence-"))
    work.mkdir(parents=True, exist_ok=True)
    lengths = sorted(set(a.L))
    print(f"work dir {work}; generating the log ({a.users} users x {-(-3 * max(lengths) // 2)} events)", flush=True)
    log = make_log(work, max(lengths), a.users)
    settings = {k: v for k, v in vars(a).items() if k not in ("out", "work")}
    settings.update(L=lengths, dim=64, num_layers=2, num_workers=1, base_config="configs/smoke.yaml")
    result: dict[str, Any] = {"benchmark": "long_sequence", "settings": settings, "records": [], "skipped": []}
    for mixer in a.mixers:
        failed = None
        for length in lengths:
            if failed:
                result["skipped"].append({"mixer": mixer, "L": length, "after": failed})
                print(f"  {mixer} L={length}: skipped (a shorter L was {failed})", flush=True)
                continue
            record = run_point(a, log, mixer, length, work)
            result["records"].append(record)
            if record["status"] != "ok":
                failed = record["status"]
            _write_quietly({"provenance": provenance(load_before), **result}, a.out)  # what is done so far
    write_result({"provenance": provenance(load_before), **result}, a.out)
    if not a.work and not any(r["status"] != "ok" for r in result["records"]):
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
