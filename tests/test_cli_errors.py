"""User errors end `python -m trainer.train` with one line on stderr, `error: ...` naming the file, key or
value, and exit status 2, the traceback in OUT/logs/driver.log; internal errors keep their traceback and exit 1
(issue #16). Each subprocess fails while loading the config or preparing the data: no Ray Train job. Every
kind of malformed log and config is checked in this process; a few of each go through the command line."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.exceptions import RayTaskError
from ray.train import ControllerError, WorkerGroupError

from data.prepare import prepare
from data.schema import LogError
from tests.helpers import ROOT, write_log
from trainer.checkpoint import CheckpointError
from trainer.config import load_config
from trainer.driver.console import Console
from trainer.errors import USER_ERRORS, ConfigError, UserError, find_user_error, one_line
from trainer.train import failed, parse_args

# a small valid log: users 1..30, 4 days; each test breaks one thing
ROWS = [(u, 1 + (u * 7 + d * 3 + k) % 40, f"2026-01-0{d} {10 + k:02d}:00:00")
        for u in range(1, 31) for d in range(1, 5) for k in range(3)]
FAST = ["distributed.num_workers=1", "training.epochs=1"]


def _train(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "trainer.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _assert_user_error(proc: subprocess.CompletedProcess, *names: str, out: Path = None) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    assert "Traceback" not in proc.stdout
    if out is not None:  # the traceback is in the run's log
        log = (out / "logs" / "driver.log").read_text()
        assert "Traceback (most recent call last)" in log and lines[0][len("error: "):] in log
    return lines[0]


def _log(tmp_path: Path) -> Path:
    return Path(write_log(tmp_path / "log", ROWS))


def _part(log: Path, day: str) -> Path:
    return log / f"day={day}" / "part-00000.parquet"


def _missing_column(log: Path) -> tuple[Path, str]:
    path = _part(log, "2026-01-02")
    pq.write_table(pq.read_table(path).drop_columns(["item_id"]), path)
    return path, "missing column 'item_id'"


def _mistyped_column(log: Path) -> tuple[Path, str]:
    path = _part(log, "2026-01-03")
    t = pq.read_table(path)
    pq.write_table(t.set_column(1, "item_id", pa.array([str(x) for x in t.column("item_id").to_pylist()])), path)
    return path, "column 'item_id' has type string"


def _truncated(log: Path) -> tuple[Path, str]:
    path = _part(log, "2026-01-01")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "not a readable Parquet file"


def _not_parquet(log: Path) -> tuple[Path, str]:
    path = _part(log, "2026-01-02")
    path.write_text("user_id,item_id,ts\n1,2,3\n")
    return path, "not a readable Parquet file"


def _bad_partition(log: Path) -> tuple[Path, str]:
    (log / "2026-01-05").mkdir()
    return log / "2026-01-05", "day=YYYY-MM-DD"


def _impossible_date(log: Path) -> tuple[Path, str]:
    (log / "day=2026-02-30").mkdir()
    return log / "day=2026-02-30", "impossible date"


BREAKS = [_missing_column, _mistyped_column, _truncated, _not_parquet, _bad_partition, _impossible_date]


# every break read by pyarrow in the driver, and two through Ray Data's tasks (errors arrive wrapped)
# the Ray back end starts Ray Data (several seconds): outside the fast tier
CASES = [(brk, "arrow") for brk in BREAKS] + [pytest.param(b, "ray", marks=pytest.mark.slow)
                                              for b in (_missing_column, _truncated)]


def IDS(x) -> str:
    return x if isinstance(x, str) else x.__name__.strip("_")


@pytest.mark.parametrize("brk,backend", CASES, ids=IDS)
def test_malformed_log_is_a_user_error_naming_the_file(tmp_path, brk, backend, request):
    """The data stage as the driver runs it, in this process; the CLI cases below show the same errors
    reach the console as one line."""
    if backend == "ray":
        request.getfixturevalue("ray_local")
    path, problem = brk(_log(tmp_path))
    cfg = load_config("configs/smoke.yaml", [*FAST, f"data.path={tmp_path / 'log'}", f"data.backend={backend}"])
    with pytest.raises(Exception) as info:
        prepare(cfg.data, tmp_path / "work", cfg.model.max_seq_len)
    user = find_user_error(info.value)
    assert user is not None, info.value
    line = one_line(user)
    assert "\n" not in line and str(path) in line and problem in line, line


@pytest.mark.cli
@pytest.mark.parametrize("brk,backend", [(_missing_column, "arrow"), (_truncated, "ray")], ids=IDS)
def test_malformed_log_is_one_error_line(tmp_path, brk, backend):
    path, problem = brk(_log(tmp_path))
    out = tmp_path / "out"
    proc = _train("--config", "configs/smoke.yaml", *FAST, f"data.path={tmp_path / 'log'}",
                  f"data.backend={backend}", f"output.dir={out}")
    _assert_user_error(proc, str(path), problem, out=out)


@pytest.mark.cli
def test_empty_evaluation_day_is_one_error_line_and_dates_work_on_the_command_line(tmp_path):
    log = _log(tmp_path)
    out = tmp_path / "out"
    # an unquoted date: YAML reads it as a date, the config takes it as "2026-01-07"
    proc = _train("--config", "configs/smoke.yaml", *FAST, f"data.path={log}", "data.eval_day=2026-01-07",
                  "data.backend=arrow", f"output.dir={out}")
    _assert_user_error(proc, "day=2026-01-07", "no events on evaluation day 2026-01-07", out=out)

@pytest.mark.cli
def test_missing_data_path_is_one_error_line(tmp_path):
    out = tmp_path / "out"
    proc = _train("--config", "configs/smoke.yaml", f"data.path={tmp_path / 'nowhere'}", f"output.dir={out}")
    _assert_user_error(proc, str(tmp_path / "nowhere"), "log directory does not exist", out=out)


BAD_CONFIGS = [
    (["model.kernal_size=3"], ["unknown key model.kernal_size"]),
    (["training.lr=fast"], ["training.lr", "'fast'"]),
    (["data.eval_day=2026-13-01"], ["data.eval_day", "2026-13-01"]),
    (["--config", "configs/nope.yaml"], ["configs/nope.yaml", "does not exist"]),
    (["eval.select=hr@7"], ["eval.select", "hr@7"]),
]


@pytest.mark.parametrize("args,names", BAD_CONFIGS)
def test_bad_config_is_a_config_error_naming_the_key(args, names):
    args = parse_args(args if "--config" in args else ["--config", "configs/smoke.yaml", *args])
    with pytest.raises(ConfigError) as info:
        load_config(args.config, args.overrides)
    line = one_line(info.value)
    assert line.startswith("error: ") and "\n" not in line
    for name in names:
        assert name in line, line


@pytest.mark.cli
def test_bad_config_is_one_error_line():
    _assert_user_error(_train("--config", "configs/smoke.yaml", "model.kernal_size=3"), "unknown key model.kernal_size")


@pytest.mark.cli
def test_unwritable_output_dir_is_one_error_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    _assert_user_error(_train("--config", "configs/smoke.yaml", f"output.dir={tmp_path / 'a-file' / 'out'}"),
                       f"output.dir={tmp_path / 'a-file' / 'out'}", "cannot write")

@pytest.mark.cli
def test_earlier_run_without_resume_is_one_error_line(tmp_path):
    out = tmp_path / "out"
    (out / "ray" / "train").mkdir(parents=True)
    proc = _train("--config", "configs/smoke.yaml", f"output.dir={out}")
    _assert_user_error(proc, str(out), "holds an earlier run", "--resume", out=out)

@pytest.mark.cli
def test_corrupt_checkpoint_on_resume_is_one_error_line(tmp_path):
    out = tmp_path / "out"
    run_dir = out / "ray" / "train"
    (run_dir / "checkpoint_x").mkdir(parents=True)  # registered, but without meta.json
    (run_dir / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_x"}}))
    proc = _train("--config", "configs/smoke.yaml", *FAST, "data.synth.users=60", "data.backend=arrow",
                  f"output.dir={out}", "--resume")  # the check follows the (small) data stage
    _assert_user_error(proc, str(run_dir / "checkpoint_x"), "meta.json", out=out)

@pytest.mark.cli
def test_more_workers_than_cpus_is_one_error_line(tmp_path):
    out = tmp_path / "out"
    proc = _train("--config", "configs/smoke.yaml", "distributed.num_workers=64", "distributed.cpus_per_worker=1",
                  f"output.dir={out}")
    _assert_user_error(proc, "distributed.num_workers=64", "needs 64 CPUs", out=out)


# ---------------------------------------------------------------- the classification itself (no subprocess)


def test_user_errors_are_value_errors_listed_in_one_place():
    assert issubclass(ConfigError, UserError) and issubclass(CheckpointError, UserError)
    assert all(issubclass(cls, ValueError) for cls in USER_ERRORS) and LogError in USER_ERRORS
    assert find_user_error(RuntimeError("a bug")) is None
    assert find_user_error(ValueError("internal")) is None  # a plain ValueError is not the user's


def test_user_errors_are_found_inside_ray_wrappers():
    log_error = LogError("/logs/day=2026-01-01/part-0.parquet", "missing column 'ts'")
    task = RayTaskError("read_file", "Traceback ...\nremote lines", log_error).as_instanceof_cause()
    assert isinstance(task, LogError)  # Ray's dual class: its message is the remote traceback
    assert find_user_error(task) is log_error
    ckpt = CheckpointError("checkpoint /x is corrupt: table/0 (rank 1) does not match its manifest")
    group = WorkerGroupError("rank 1 failed", {0: RuntimeError("peer died"), 1: ckpt})
    assert find_user_error(group) is ckpt
    assert find_user_error(ControllerError(group)) is ckpt
    try:
        try:
            raise log_error
        except LogError as e:
            raise RuntimeError("while preparing the data") from e
    except RuntimeError as chained:
        assert find_user_error(chained) is log_error
    assert find_user_error(WorkerGroupError("x", {0: RuntimeError("bug")})) is None


def test_one_line_flattens_a_multi_line_message():
    assert one_line(ValueError("first\n  second\n")) == "error: first; second"


def test_internal_error_keeps_its_traceback_and_exits_1():
    out, err, log = io.StringIO(), io.StringIO(), io.StringIO()
    console = Console(out, err, log, verbose=False)
    try:
        raise RuntimeError("an internal bug")
    except RuntimeError as e:
        assert failed(e, console) == 1
    assert "Traceback (most recent call last)" in err.getvalue() and "an internal bug" in err.getvalue()
    assert "Traceback (most recent call last)" in log.getvalue()
    console.err = err = io.StringIO()
    try:
        raise WorkerGroupError("x", {0: LogError("/l/day=2026-01-01", "no events")})
    except WorkerGroupError as e:
        assert failed(e, console) == 2
    assert err.getvalue().strip() == "error: /l/day=2026-01-01: no events"
