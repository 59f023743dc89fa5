"""Ctrl-C and SIGTERM stop the driver within seconds, leave no process of the run behind, and tell the user
to rerun with --resume, which continues from the latest checkpoint (issue #6).

The driver runs as `python -m trainer.train` in its own session, so a signal to its process group reaches what
a terminal's Ctrl-C would: the driver, its local Ray instance and the workers. 3 to 9 minutes on 2
cores, by load."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import SMALL
from tests.helpers import small_run_config as small_config
from trainer.checkpoint import latest_checkpoint
from trainer.driver.launch import run

ROOT = Path(__file__).resolve().parent.parent
# A checkpoint every 5 steps: one exists early, and --resume starts in the middle of an epoch.
OVERRIDES = ["training.epochs=3", "output.checkpoint_every=5"]
STARTUP_S = 420  # Ray, data and workers on a loaded 2-core machine
STOP_S = 60  # from the signal to the driver's exit


def _start(out: Path) -> tuple[subprocess.Popen, Path]:
    log = out.parent / f"{out.name}.log"
    cmd = [sys.executable, "-m", "trainer.train", "--config", "configs/smoke.yaml", *SMALL, *OVERRIDES,
           f"output.dir={out}"]
    env = dict(os.environ)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _wait_for(proc: subprocess.Popen, log: Path, ready, what: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {STARTUP_S} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return left


def _stop(proc: subprocess.Popen, log: Path, sig: int, group: bool) -> tuple[int, float, str]:
    """Send `sig`; return the exit status, the seconds to exit and the log. Fails if any process of the
    run (the driver's descendants, or anything left in its session) outlives it."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert tree, "the driver should have started Ray"
    t0 = time.monotonic()
    if group:
        os.killpg(proc.pid, sig)  # a terminal's Ctrl-C: the whole foreground process group
    else:
        proc.send_signal(sig)  # a job scheduler's or `kill`'s SIGTERM: the driver alone
    try:
        rc = proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the driver still runs {STOP_S} s after {signal.Signals(sig).name}:\n{log.read_text()[-4000:]}")
    elapsed = time.monotonic() - t0
    deadline = time.monotonic() + 15
    while (left := _alive(tree)) and time.monotonic() < deadline:
        time.sleep(0.5)
    in_session = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                in_session.append(f"{p.pid} {p.name()}")
        except (OSError, psutil.Error):
            pass
    assert not left and not in_session, f"processes of the run outlived the driver: {left or in_session}"
    return rc, elapsed, log.read_text()


@pytest.fixture
def driver(tmp_path):
    started: list[subprocess.Popen] = []

    def start(out: Path):
        proc, log = _start(out)
        started.append(proc)
        return proc, log

    yield start
    for proc in started:  # a failed test must not leave a run behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.ray_train
def test_ctrl_c_stops_the_run_and_resume_finishes_it(driver, tmp_path):
    out = tmp_path / "run"
    proc, log = driver(out)
    _wait_for(proc, log, lambda: latest_checkpoint(out / "ray" / "train") is not None, "checkpoint")
    rc, elapsed, text = _stop(proc, log, signal.SIGINT, group=True)
    print(f"SIGINT -> driver exit: {elapsed:.1f} s")
    assert rc == 130, text[-4000:]
    assert "interrupted by SIGINT; rerun with --resume to continue from the checkpoint at step" in text
    assert "results.json" not in os.listdir(out)

    resumed = run(small_config(out, *OVERRIDES), resume=True)
    assert resumed["throughput"]["restored_from_checkpoint"]
    assert resumed["throughput"]["epochs_completed"] == 3
    metrics = resumed["metrics"]
    assert {"hr@10", "ndcg@10", "mrr"} <= set(metrics)
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in metrics.values())


@pytest.mark.ray_train
def test_sigterm_while_workers_start_stops_the_run(driver, tmp_path):
    # the window in which Ray Train's own SIGINT handling used to wait for the worker group to come up
    out = tmp_path / "run"
    proc, log = driver(out)
    _wait_for(proc, log, lambda: (out / "ray" / "train").is_dir(), "Ray Train run directory")
    rc, elapsed, text = _stop(proc, log, signal.SIGTERM, group=False)
    print(f"SIGTERM -> driver exit: {elapsed:.1f} s")
    assert rc == 143, text[-4000:]  # not SIGABRT from Ray's failure-signal handler
    assert "interrupted by SIGTERM; " in text and "rerun with --resume" in text


# ---------------------------------------------------------------- the handler itself, without Ray (fast)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signals_raise_and_keep_their_handler(sig):
    from trainer.train import Interrupted, StopSignals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signals = StopSignals()
    with pytest.raises(Interrupted):
        with signals:
            signal.signal(sig, lambda *a: None)  # what ray.init and TorchTrainer.fit() do: ignored
            signal.signal(signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))  # other signals are untouched
            os.kill(os.getpid(), sig)
            time.sleep(1)  # the handler runs at the next bytecode boundary
            pytest.fail("the signal did not interrupt")
    assert signals.received == sig
    assert signal.getsignal(sig) is signal.SIG_IGN  # during the shutdown that follows
    signals.restore()
    assert {s: signal.getsignal(s) for s in before} == before


def test_resume_hint_names_the_checkpoint(tmp_path):
    import json

    from trainer.train import resume_hint

    cfg = small_config(tmp_path)
    assert "no checkpoint was saved yet: rerun with --resume" in resume_hint(cfg)
    run_dir = tmp_path / "ray" / "train"
    (run_dir / "checkpoint_x").mkdir(parents=True)
    (run_dir / "checkpoint_x" / "meta.json").write_text(json.dumps({"step": 15, "epoch": 0}))
    (run_dir / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_x"}}))
    assert resume_hint(cfg).startswith("rerun with --resume to continue from the checkpoint at step 15 (epoch 0)")
