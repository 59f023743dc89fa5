"""The console (phase lines, training progress from metrics.jsonl, nothing twice) and the built-in tracking
(TensorBoard event files under OUT/tb/, OUT/curves.png), issue #16. The unit tests need no Ray; one small run
through `python -m trainer.train` checks the whole console and reads the event files back."""

import io
import json
import os
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from tensorboardX.proto import event_pb2

from tests.helpers import ROOT, SMALL
from trainer.driver.console import Console, Progress, estimate_steps_per_epoch
from trainer.driver.tracking import TensorBoard, plot_curves

# lines a small run may print: measured 21 (7 phase lines, 3 progress lines, 3 for the end of training and
# evaluation, 6 of table, and slack); before issue #16 the same run printed 112.
MAX_LINES = 30


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under `tb_dir`: tag -> [(step, value)], by parsing the TFRecord
    framing (length u64, crc u32, Event bytes, crc u32) with tensorboardX's own protobufs."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


RECORDS = [
    {"time": 1.0, "step": 5, "epoch": 0, "loss": 5.0, "events_per_s": 1000.0},
    {"time": 2.0, "step": 10, "epoch": 0, "loss": 4.5, "events_per_s": 1100.0},
    {"time": 3.0, "step": 10, "epoch": 1, "checkpoint": "/x/checkpoint_1"},
    {"time": 3.5, "step": 10, "epoch": 1, "valid/ndcg@10": 0.25, "valid/hr@10": 0.5},
    {"time": 4.0, "step": 15, "epoch": 1, "loss": 4.0, "events_per_s": 1200.0},
    {"time": 5.0, "step": 20, "epoch": 2, "checkpoint": "/x/checkpoint_2"},
    {"time": 5.5, "step": 20, "epoch": 2, "valid/ndcg@10": 0.3, "valid/hr@10": 0.55},
    {"time": 6.0, "step": 20, "epoch": 2, "phase": "evaluation"},
]
RESULTS = {"metrics": {"hr@10": 0.6, "ndcg@10": 0.31}, "throughput": {"steps": 20, "events_per_s": 1150.0},
           "baselines": {"popularity": {"hr@10": 0.3, "ndcg@10": 0.15, "eval_day": "2026-01-04"}}}


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
def test_small_run_console_is_short_has_no_line_twice_and_tracks(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--config", "configs/smoke.yaml", *SMALL,
                           f"output.dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
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
