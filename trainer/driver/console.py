"""The driver's console: one line at the start and at the end of each phase, a live training display, the
results table, and `error: ...` lines. Everything else (Ray, TorchRec, DeepSpeed, warnings, tracebacks)
goes to OUT/logs/driver.log; `--verbose` leaves it on the console as well.

Training progress is drawn from OUT/metrics.jsonl, which Ray Train's controller appends to for every
`ray.train.report` (trainer/driver/callbacks.py): a thread in the driver follows the file while
`trainer.fit()` runs. On a terminal it is a tqdm bar (epoch, step, loss, events/s, ETA); elsewhere (job logs,
pipes) a plain line at most every `plain_every_s` seconds and at each epoch's end. Workers print nothing to
the console: their output stays in Ray's logs (and OUT/logs/worker-RANK.log).
"""

import io
import json
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TextIO

import pyarrow.parquet as pq
from tqdm import tqdm

LOG_DIR = "logs"
DRIVER_LOG = "driver.log"


class Console:
    """`out`: phase lines, progress and the table; `err`: error lines; `log`: the driver log (tracebacks).
    `verbose`: library and worker output is shown too (the driver asks Ray to forward the workers')."""

    def __init__(self, out: Optional[TextIO] = None, err: Optional[TextIO] = None, log: Optional[TextIO] = None,
                 verbose: bool = True) -> None:
        self.out, self.err, self.log = out or sys.stdout, err or sys.stderr, log
        self.verbose = verbose
        self.bar: Any = None  # the tqdm bar while one is open: lines are written around it
        self._lock = threading.Lock()

    @classmethod
    def for_run(cls, out_dir: str, verbose: bool = False) -> "Console":
        """The console of a command-line run. Unless `verbose`, file descriptors 1 and 2 are pointed at
        OUT/logs/driver.log (so is everything Ray, C++ libraries and Python write there, child processes
        included) and the console keeps its own copies of the terminal's."""
        logs = Path(out_dir).resolve() / LOG_DIR
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / DRIVER_LOG
        log = open(path, "a", buffering=1)
        if verbose:
            return cls(sys.stdout, sys.stderr, log, verbose=True)
        sys.stdout.flush()
        sys.stderr.flush()
        out = os.fdopen(os.dup(1), "w", buffering=1)
        err = os.fdopen(os.dup(2), "w", buffering=1)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        return cls(out, err, log, verbose=False)

    @property
    def tty(self) -> bool:
        """A terminal that can show a bar (a pseudo-terminal without a size, as `script` gives, cannot)."""
        try:
            return self.out.isatty() and os.get_terminal_size(self.out.fileno()).columns > 0
        except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
            return False

    def line(self, text: str) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.write(text, file=self.out)
            else:
                print(text, file=self.out, flush=True)
            if self.log is not None and not self.verbose and self.log is not self.out:
                print(text, file=self.log, flush=True)

    def error(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def to_log(self, text: str) -> None:
        if self.log is not None:
            print(text, file=self.log, flush=True)

    @contextmanager
    def phase(self, name: str, phases: dict[str, float], key: str, start: str = "") -> Iterator[dict[str, str]]:
        """One line at the start (`name ... start`) and one at the end (`name done in 1.2 s; note`), where
        the block may set note["note"]. The seconds go to phases[key]. Nothing is printed at the end of a
        block that raised (the error line says why)."""
        note: dict[str, str] = {}
        self.line(f"{name} ..." + (f" {start}" if start else ""))
        t0 = time.perf_counter()
        yield note
        phases[key] = time.perf_counter() - t0
        self.line(f"{name} done in {_seconds(phases[key])}" + (f"; {note['note']}" if note.get("note") else ""))


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:02.0f} s"


def _clock(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def estimate_steps_per_epoch(train_sequences: str, seq_len: int, batch_size: int, world_size: int) -> int:
    """Steps in an epoch, from the Parquet metadata of the training sequences alone (no data read): a user
    with t transitions gives ceil(t / L) windows, about t / L + 1/2; ranks step together over an even share."""
    users = events = 0
    for name in sorted(os.listdir(train_sequences)):
        if not name.endswith(".parquet"):
            continue
        md = pq.ParquetFile(os.path.join(train_sequences, name)).metadata
        users += md.num_rows
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            events += sum(rg.column(j).num_values for j in range(rg.num_columns)
                          if rg.column(j).path_in_schema.startswith("item_ids."))
    windows = max(0, events - users) / seq_len + users / 2
    return max(1, math.ceil(windows / world_size / batch_size))


class Count:
    """A count towards a total (events read, queries ranked): a tqdm bar on a terminal, else a plain line at
    most every `plain_every_s` seconds and at the end. Callable from any thread; `close()` ends the bar."""

    def __init__(self, console: Console, desc: str, unit: str, noun: str, plain_every_s: float = 10.0) -> None:
        """`unit`: the bar's (event, query); `noun`: the plain line's (events read, queries ranked)."""
        self.console, self.desc, self.unit, self.noun, self.plain_every_s = console, desc, unit, noun, plain_every_s
        self.t0 = time.perf_counter()
        self.last_plain = self.t0  # the phase's own start line was just printed
        self.bar: Any = None
        self.shown = (0, 0)

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.console.tty:
            if self.bar is None:
                self.bar = tqdm(total=total, unit=self.unit, file=self.console.out, dynamic_ncols=True,
                                desc=self.desc, leave=False)
                self.console.bar = self.bar
            self.bar.total = total
            self.bar.update(done - self.bar.n)
        elif done and now - self.last_plain >= self.plain_every_s and (done, total) != self.shown:
            self.last_plain, self.shown = now, (done, total)
            eta = (now - self.t0) * (total - done) / done
            self.console.line(f"{self.desc}  {done:,}/{total:,} {self.noun}  ETA {_clock(max(eta, 0.0))}")

    def close(self) -> None:
        if self.bar is not None:
            bar, self.bar = self.bar, None
            if self.console.bar is bar:
                self.console.bar = None
            bar.close()


class Progress:
    """Follows OUT/metrics.jsonl in a thread while training runs: shows progress on `console`, passes every
    new record to `on_record` (the TensorBoard writer), prints the end of training and the start of
    evaluation when the workers report {"phase": "evaluation"}, and the queries ranked so far as they report
    them (eval_queries of eval_total)."""

    def __init__(self, console: Console, path: Path, epochs: int, max_steps: int, steps_per_epoch: int,
                 select: Optional[str] = None, on_record: Optional[Callable[[dict[str, Any]], None]] = None,
                 plain_every_s: float = 10.0, poll_s: float = 0.5) -> None:
        self.console, self.path = console, Path(path)
        self.epochs, self.max_steps, self.steps_per_epoch = epochs, max_steps, steps_per_epoch
        self.select, self.on_record = select, on_record
        self.plain_every_s, self.poll_s = plain_every_s, poll_s
        self.offset = self.path.stat().st_size if self.path.exists() else 0  # on --resume: only new records
        self._partial = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="progress", daemon=True)
        self.t_start = time.perf_counter()
        self.t_eval: Optional[float] = None
        self.first: Optional[tuple[float, int]] = None  # (time, step) of the first report: the rate's origin
        self.last_plain = float("-inf")
        self.last_epoch = -1
        self.step = 0
        self.loss: Optional[float] = None
        self.rate: Optional[float] = None
        self.ranked: Optional[Count] = None  # queries ranked, once the workers report them

    @property
    def total(self) -> int:
        total = self.epochs * self.steps_per_epoch
        if self.max_steps:
            total = min(total, self.max_steps) if self.steps_per_epoch else self.max_steps
        return max(total, self.step)

    def __enter__(self) -> "Progress":
        if self.console.tty:
            self.console.bar = tqdm(total=self.total, unit="step", file=self.console.out, dynamic_ncols=True,
                                    desc="training", leave=False)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._close_bar()

    def _close_bar(self) -> None:
        if self.console.bar is not None:
            bar, self.console.bar = self.console.bar, None
            bar.close()

    # ---------------------------------------------------------------- reading

    def _follow(self) -> None:
        while True:
            stopping = self._stop.wait(self.poll_s)
            try:
                for record in self._new_records():
                    self.handle(record)
            except Exception as e:  # progress must never stop the run
                self.console.to_log(f"progress display: {type(e).__name__}: {e}")
            if stopping:
                return

    def _new_records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    # ---------------------------------------------------------------- showing

    def handle(self, r: dict[str, Any]) -> None:
        if self.on_record is not None:
            try:
                self.on_record(r)
            except Exception as e:
                self.console.to_log(f"tracking: {type(e).__name__}: {e}")
        step, epoch = int(r.get("step", self.step)), int(r.get("epoch", 0))
        if "checkpoint" in r and epoch >= 1 and self.last_epoch < epoch and not self.max_steps:
            self.steps_per_epoch = max(1, round(step / epoch))  # the end-of-epoch checkpoint: measured
        self.step = max(self.step, step)
        if r.get("phase") == "evaluation":
            self.end_training()
            if "eval_queries" in r:
                self.evaluation(int(r["eval_queries"]), int(r["eval_total"]))
            return
        valid = {k[len("valid/"):]: v for k, v in r.items() if k.startswith("valid/")}
        if valid:
            key = self.select if self.select in valid else sorted(valid)[0]
            self.console.line(f"validation after epoch {epoch}: {key} {valid[key]:.4f}")
        if "loss" in r:
            self.loss, self.rate = float(r["loss"]), float(r.get("events_per_s", 0.0))
            now = time.perf_counter()
            if self.first is None:
                self.first = (now, step)
            new_epoch = epoch != self.last_epoch
            self.last_epoch = max(self.last_epoch, epoch)
            if self.console.bar is not None:
                self._draw(epoch)
            elif new_epoch or now - self.last_plain >= self.plain_every_s:
                self.last_plain = now
                self.console.line(self.status(epoch, now))

    def eta(self, now: float) -> Optional[float]:
        if self.first is None or self.step <= self.first[1]:
            return None
        rate = (self.step - self.first[1]) / (now - self.first[0])
        return (self.total - self.step) / rate if rate > 0 else None

    def status(self, epoch: int, now: float) -> str:
        eta = self.eta(now)
        return (f"training  epoch {min(epoch + 1, self.epochs)}/{self.epochs}  step {self.step}/~{self.total}  "
                f"loss {self.loss:.4f}  {self.rate:,.0f} events/s  ETA {'?' if eta is None else _clock(eta)}")

    def _draw(self, epoch: int) -> None:
        bar = self.console.bar
        bar.total = self.total
        bar.set_postfix_str(f"epoch {min(epoch + 1, self.epochs)}/{self.epochs} loss {self.loss:.4f} "
                            f"{self.rate:,.0f} events/s", refresh=False)
        bar.update(self.step - bar.n)

    def end_training(self) -> None:
        if self.t_eval is not None:
            return
        self.t_eval = time.perf_counter()
        self._close_bar()
        self.console.line(f"training done in {_seconds(self.t_eval - self.t_start)}; {self.step} steps"
                          + (f", loss {self.loss:.4f}" if self.loss is not None else ""))
        self.console.line("evaluation ... ranking the full catalogue")

    def evaluation(self, done: int, total: int) -> None:
        if self.ranked is None:
            self.ranked = Count(self.console, "evaluation", "query", "queries ranked", self.plain_every_s)
        self.ranked(done, total)

    def end_evaluation(self) -> None:
        """After fit() returned: the end of the evaluation phase (and of training, if no record said so)."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.end_training()
        self._close_bar()
        self.console.line(f"evaluation done in {_seconds(time.perf_counter() - self.t_eval)}")
