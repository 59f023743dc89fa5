"""Entry point: prepare data, run the Ray Train job, write results.json, print the metrics table.

    python -m trainer.train --config configs/smoke.yaml [section.key=value ...] [--resume]

Starts a local Ray instance, or joins the cluster named by RAY_ADDRESS. Ctrl-C (SIGINT) or SIGTERM stops
the run within seconds: the workers and the local Ray instance are shut down, the exit status is 128 + the
signal number (130, 143), and the message names the checkpoint that `--resume` continues from.

The console shows one line per phase, training progress and the results table; library output goes to
OUT/logs/ (`--verbose`: to the console as well). A user error (trainer/errors.py: config, log, path,
resources, checkpoint) ends the run with one line on stderr, `error: ...`, and exit status 2, its traceback
in OUT/logs/driver.log; an internal error prints its traceback and exits 1.
"""

import argparse
import json
import signal
import sys
import traceback
from typing import Optional, Sequence

import ray

from trainer.checkpoint import CheckpointError, latest_checkpoint, read_meta
from trainer.config import Config, load_config
from trainer.driver.console import Console
from trainer.driver.launch import run, run_dir
from trainer.driver.report import RESULTS_MARKER, format_table
from trainer.errors import ConfigError, find_user_error, one_line

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML file in configs/ (default: built-in defaults)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint (in output.storage, default output.dir/ray)")
    p.add_argument("--print-results", action="store_true",
                   help="also print results.json as one log line (for job logs)")
    p.add_argument("--verbose", action="store_true",
                   help="show library and worker output on the console too (default: only in OUT/logs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.kernel_size=64")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:  # no output.dir to log to yet; the message is the whole story
        print(one_line(e), file=sys.stderr, flush=True)
        return 2
    try:
        console = Console.for_run(cfg.output.dir, verbose=args.verbose)
    except OSError as e:  # e.g. no permission: a path the user gave
        print(f"error: output.dir={cfg.output.dir}: cannot write the run's logs there ({e})", file=sys.stderr)
        return 2
    signals = StopSignals()
    try:
        with signals:
            results = run(cfg, resume=args.resume, console=console)
    except BaseException as e:
        if signals.received is not None:
            return shut_down(signals, cfg, console)
        return failed(e, console)
    console.line(format_table(results))
    if args.print_results:
        console.line(RESULTS_MARKER + json.dumps(results, default=str))
    return 0


def failed(e: BaseException, console: Console) -> int:
    """A user error: one `error:` line on stderr, exit 2; anything else: the traceback, exit 1. The
    traceback goes to OUT/logs/driver.log either way."""
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        raise e
    console.to_log("".join(traceback.format_exception(e)))
    user = find_user_error(e)
    if user is not None:
        console.error(one_line(user))
        return 2
    console.error("".join(traceback.format_exception(e)).rstrip())
    console.error(f"internal error ({type(e).__name__}); the traceback is also in the run's log, OUT/logs/driver.log")
    return 1


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by SIGINT or SIGTERM while the run is in progress."""


class StopSignals:
    """While in the `with` block, SIGINT and SIGTERM raise `Interrupted` in the main thread (and set
    `received`), and Ray is kept from replacing that handler.

    Ray would otherwise take both signals over. `TorchTrainer.fit()` sets SIGINT to a handler that blocks
    until the train controller actor has aborted the run, an RPC the controller serves only when its event
    loop is free: while it is starting the worker group (13 s and more here) training goes on and the
    first Ctrl-C seems ignored, a second one does nothing, a third exits with status 0; when it does stop,
    the driver exits 1 with no word about what happened. `ray.init` sets SIGTERM to `sys.exit`, and a local
    instance's node then tears itself down from inside that handler (and the driver ends in SIGABRT: see
    `_handler`). Both install their handlers through `signal.signal`, so inside the block that call leaves these two
    signals alone. On leaving the block after a signal, further ones are ignored until `restore()`, so
    the shutdown is not cut short.
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}
        self._set = signal.signal

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGTERM:
            # Ray's C++ failure-signal handler (absl's) sees SIGTERM first, logs it, and arms a 3 s alarm
            # whose handler aborts the process (SIGABRT) unless it has exited by then: cancel it.
            signal.alarm(0)
        if self.received is None:
            self.received = signum
        raise Interrupted(signal.Signals(signum).name)

    def _guarded(self, signalnum, handler):
        if signalnum in STOP_SIGNALS:
            return signal.getsignal(signalnum)  # keep ours
        return self._set(signalnum, handler)

    def __enter__(self) -> "StopSignals":
        self._previous = {s: self._set(s, self._handler) for s in STOP_SIGNALS}
        signal.signal = self._guarded
        return self

    def __exit__(self, *exc) -> None:
        signal.signal = self._set
        if self.received is None:
            self.restore()
        else:
            for s in STOP_SIGNALS:
                self._set(s, signal.SIG_IGN)

    def restore(self) -> None:
        for s, h in self._previous.items():
            self._set(s, h)


def shut_down(signals: StopSignals, cfg: Config, console: Optional[Console] = None) -> int:
    """After SIGINT/SIGTERM: stop the workers and Ray, say how to continue. Returns the exit status."""
    console = console or Console()
    name = signal.Signals(signals.received).name
    console.error(f"\n{name} received: stopping the workers and Ray ...")
    try:
        # A local instance (this driver started it) goes down with its workers; on a cluster this ends the
        # driver's job, and with it the train controller and its worker group (the driver's actors).
        ray.shutdown()
    finally:
        signals.restore()
    try:
        hint = resume_hint(cfg)
    except Exception as e:  # e.g. unreachable storage: the exit status and the advice matter more
        hint = f"rerun with --resume to continue from the latest checkpoint ({type(e).__name__}: {e})"
    console.error(f"interrupted by {name}; {hint}")
    return 128 + signals.received


def resume_hint(cfg: Config) -> str:

    ckpt = latest_checkpoint(run_dir(cfg))
    if ckpt is None:
        return f"no checkpoint was saved yet: rerun with --resume to start again (output.dir={cfg.output.dir})"
    where = str(ckpt)
    try:
        meta = read_meta(ckpt)
        where = f"step {meta['step']} (epoch {meta['epoch']}), {ckpt}"
    except (CheckpointError, OSError, ValueError, KeyError):
        pass
    return f"rerun with --resume to continue from the checkpoint at {where}"


if __name__ == "__main__":
    sys.exit(main())
