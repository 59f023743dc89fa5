"""The console (phase lines, training progress from metrics.jsonl, nothing twice) and the built-in tracking
(TensorBoard event files under OUT/tb/, OUT/curves.png), issue #16. The unit tests need no Ray; one small run
through `python -m trainer.train` checks the whole console and reads the event files back."""

import io
import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from tests.helpers import RECORDS, RESULTS, ROOT, SMALL, read_scalars
from trainer.driver.console import Console, Count, Progress, estimate_steps_per_epoch
from trainer.driver.tracking import TensorBoard, plot_curves

# lines a small run may print: measured 21 (7 phase lines, 3 progress lines, 3 for the end of training and
# evaluation, 6 of table, and slack); before issue #16 the same run printed 112.
MAX_LINES = 30


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(out, io.StringIO(), io.StringIO(), verbose=False), out


def test_phase_lines_start_and_end():
    console, out = _console()
    phases: dict[str, float] = {}
    with console.phase("data", phases, "data", "synthetic log") as note:
        note["note"] = "300 users"
    with pytest.raises(RuntimeError):
        with console.phase("baselines", phases, "baselines"):
            raise RuntimeError("x")
    lines = out.getvalue().splitlines()
    assert lines[0] == "data ... synthetic log" and lines[1].startswith("data done in ") and "300 users" in lines[1]
    assert lines[2:] == ["baselines ..."]  # no "done" line for a phase that failed
    assert set(phases) == {"data"}


def test_progress_follows_metrics_jsonl_in_plain_lines(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"step": 99, "loss": 9.0}) + "\n")  # an earlier run's record: not shown
    console, out = _console()
    seen = []
    with Progress(console, log, epochs=2, max_steps=0, steps_per_epoch=8, select="ndcg@10", on_record=seen.append,
                  plain_every_s=3600, poll_s=0.05) as progress:
        with open(log, "a") as f:
            for r in RECORDS[:2]:
                f.write(json.dumps(r) + "\n")
            f.write(json.dumps(RECORDS[2])[:10])  # half a line: read once it is complete
            f.flush()
            time.sleep(0.5)
            f.write(json.dumps(RECORDS[2])[10:] + "\n")
            for r in RECORDS[3:]:
                f.write(json.dumps(r) + "\n")
        deadline = time.monotonic() + 10
        while len(seen) < len(RECORDS) and time.monotonic() < deadline:
            time.sleep(0.05)
        progress.end_evaluation()
    assert seen == RECORDS
    lines = out.getvalue().splitlines()
    # one line at the first report and one per new epoch (plain_every_s is long), validation by eval.select
    assert lines[0].startswith("training  epoch 1/2  step 5/~16  loss 5.0000  1,000 events/s  ETA ?")
    assert lines[1] == "validation after epoch 1: ndcg@10 0.2500"
    assert lines[2].startswith("training  epoch 2/2  step 15/~20  loss 4.0000")  # 10 steps/epoch measured
    assert lines[3] == "validation after epoch 2: ndcg@10 0.3000"
    assert lines[4].startswith("training done in ") and "20 steps" in lines[4]
    assert lines[5].startswith("evaluation ...") and lines[6].startswith("evaluation done in ")
    assert len(lines) == 7


class _Terminal(Console):
    tty = True  # a StringIO stands in for the terminal


def test_progress_on_a_terminal_is_a_tqdm_bar(tmp_path):
    log = tmp_path / "metrics.jsonl"
    out = io.StringIO()
    console = _Terminal(out, io.StringIO(), None, verbose=False)
    with Progress(console, log, epochs=2, max_steps=0, steps_per_epoch=10, poll_s=0.05) as progress:
        assert console.bar is not None
        for r in RECORDS[:2]:
            progress.handle(r)
            time.sleep(0.15)  # tqdm redraws at most every 0.1 s
        console.line("a line while the bar is open")
        progress.end_evaluation()
    text = out.getvalue()
    assert "10/20" in text and "step/s" in text and "loss 4.5000" in text and "1,100 events/s" in text
    assert "a line while the bar is open\n" in text and console.bar is None


def test_counts_of_events_and_queries_in_plain_lines_and_on_a_terminal(tmp_path):
    console, out = _console()
    events = Count(console, "data", "event", "events read", plain_every_s=0.0)
    events(0, 1000)  # nothing read yet: no line
    events(250, 1000)
    events(250, 1000)  # unchanged: no second line
    events(1000, 1000)
    assert [line.split("  ETA")[0] for line in out.getvalue().splitlines()] == [
        "data  250/1,000 events read", "data  1,000/1,000 events read"]
    # evaluation: the records workers send while ranking, through Progress
    log = tmp_path / "metrics.jsonl"
    console, out = _console()
    with Progress(console, log, epochs=1, max_steps=0, steps_per_epoch=4, plain_every_s=0.0) as progress:
        for done in (0, 40, 80):
            progress.handle({"step": 4, "epoch": 1, "phase": "evaluation", "eval_queries": done, "eval_total": 100})
        progress.end_evaluation()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("training done in ") and lines[1].startswith("evaluation ...")
    assert [line.split("  ETA")[0] for line in lines[2:4]] == ["evaluation  40/100 queries ranked",
                                                                "evaluation  80/100 queries ranked"]
    assert lines[4].startswith("evaluation done in ") and len(lines) == 5
    terminal = io.StringIO()
    console = _Terminal(terminal, io.StringIO(), None, verbose=False)
    events = Count(console, "data", "event", "events read")
    events(500, 1000)
    assert console.bar is not None and console.bar.n == 500
    events.close()
    assert console.bar is None and "data:" in terminal.getvalue() and "/1000" in terminal.getvalue()


def test_steps_per_epoch_estimate_from_parquet_metadata(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # 10 users of 41 events: 2 windows of 20 transitions each, 20 windows, 3 steps of 2 ranks x 4; the estimate
    table = pa.table({"user_id": pa.array(range(10), pa.int64()),
                      "item_ids": pa.array([list(range(1, 42))] * 10, pa.list_(pa.int64()))})
    pq.write_table(table, tmp_path / "part-00000.parquet")
    # counts each user's last window as half full: 400 / 20 + 10 / 2 = 25 windows, 4 steps
    assert estimate_steps_per_epoch(str(tmp_path), seq_len=20, batch_size=4, world_size=2) == 4


def test_tensorboard_and_curves_from_records(tmp_path):
    tb = TensorBoard(tmp_path / "tb")
    for r in RECORDS:
        tb.record(r)
    tb.finish(RESULTS)
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(5, 5.0), (10, 4.5), (15, 4.0)]
    assert [s for s, _ in scalars["train/events_per_s"]] == [5, 10, 15]
    # the records' lr/dense and lr/sparse, under train/ (trainer/driver/tracking.py: LR_KEYS)
    assert scalars["train/lr_dense"] == [(5, pytest.approx(1e-4)), (10, pytest.approx(5e-4)),
                                         (15, pytest.approx(1e-3))]
    assert scalars["train/lr_sparse"] == [(5, pytest.approx(0.05)), (10, pytest.approx(0.05)),
                                          (15, pytest.approx(0.04))]
    assert not any(name.startswith("lr/") for name in scalars)
    assert scalars["valid/ndcg_10"] == [(10, 0.25), (20, pytest.approx(0.3))]
    assert scalars["heldout/hr_10"] == [(20, pytest.approx(0.6))]
    assert scalars["baseline/popularity/hr_10"] == [(20, pytest.approx(0.3))]
    assert "baseline/popularity/eval_day" not in scalars
    assert scalars["throughput/events_per_s"] == [(20, 1150.0)]
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    png = plot_curves(log, tmp_path / "curves.png", "ndcg@10", RESULTS)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_nothing_logged_reads_as_nothing(tmp_path):
    tb = TensorBoard(tmp_path / "tb")
    tb.close()
    assert read_scalars(tmp_path / "tb") == {}  # so the checks above fail when nothing is logged


# ---------------------------------------------------------------- a whole run (Ray Train)


@pytest.mark.ray_train
def test_small_run_console_is_short_has_no_line_twice_and_tracks(tmp_path, monkeypatch):
    out = tmp_path / "run"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--config", "configs/smoke.yaml", *SMALL,
                           f"output.dir={out}", f"output.mlflow_uri={tmp_path / 'mlruns'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stderr == "", proc.stderr[-4000:]
    twice = [line for line, n in Counter(lines).items() if n > 1]
    assert not twice, twice
    assert len(lines) < MAX_LINES, "\n".join(lines)
    for phase in ("ray start", "data", "baselines", "training", "evaluation"):
        assert any(line.startswith(f"{phase} ...") for line in lines), phase
        assert any(line.startswith(f"{phase} done in ") for line in lines), phase
    assert any(line.startswith("training  epoch ") and " events/s  ETA " in line for line in lines)
    assert any(line.startswith("model ") for line in lines)  # the table
    # library and worker output went to OUT/logs/ instead
    assert "Traceback" not in (out / "logs" / "driver.log").read_text()
    assert {p.name for p in (out / "logs").iterdir()} >= {"driver.log", "worker-0.log", "worker-1.log"}
    assert "SplitTableBatchedEmbeddingBagsCodegen" in (out / "logs" / "worker-0.log").read_text()  # TorchRec's dump

    scalars = read_scalars(out / "tb")
    results = json.loads((out / "results.json").read_text())
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(losses) and len(losses) >= 2
    assert scalars["heldout/hr_10"][0][1] == pytest.approx(results["metrics"]["hr@10"])
    assert scalars["baseline/popularity/hr_10"][0][1] == pytest.approx(results["baselines"]["popularity"]["hr@10"])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the trainer's tracker sets for a file store
    client = MlflowClient(tracking_uri=str(tmp_path / "mlruns"))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["heldout/hr_10"] == pytest.approx(results["metrics"]["hr@10"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"curves.png", "results.json"}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = results["config"]["training"]
    assert all(r["lr/dense"] == cfg["lr"] and r["lr/sparse"] == pytest.approx(cfg["sparse_lr"])
               for r in records if "loss" in r)  # the optimizers' rates, as reported
    ranked = [(r["eval_queries"], r["eval_total"]) for r in records if "eval_queries" in r]
    assert ranked and all(total == results["data"]["num_eval_queries"] for _, total in ranked)
    assert [done for done, _ in ranked] == sorted(done for done, _ in ranked) and ranked[-1][0] < ranked[-1][1]
