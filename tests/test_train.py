"""The trainer end to end through the real stack: Ray Train workers, the TorchRec table, DeepSpeed,
Parquet data. Three small runs shared by the tests (about a minute each on 2 cores)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data.config import SynthConfig
from data.movielens import convert
from data.synth import generate
from tests.helpers import small_run_config as small_config
from trainer.checkpoint import CheckpointError, latest_checkpoint, verify
from trainer.config import load_config
from trainer.driver.launch import run

pytestmark = pytest.mark.ray_train


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    return out, run(small_config(out, "output.export_embeddings=true"))


def _losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def test_end_to_end(two_workers):
    out, results = two_workers
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["metrics"] == results["metrics"]
    metrics = results["metrics"]
    for key in ("hr@1", "hr@10", "hr@50", "ndcg@10", "mrr", "recall@10"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["hr@1"] <= metrics["hr@10"] <= metrics["hr@50"]
    assert set(results["baselines"]) == {"popularity", "oracle"}
    assert results["world_size"] == 2 and len(results["peak_memory_bytes_per_worker"]) == 2
    assert results["throughput"]["events_per_s"] > 0 and results["config"]["model"]["dim"] == 16
    losses = _losses(out)
    assert len(losses) >= 4 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2  # it learns
    # the last checkpoint holds both ranks' table shards, the dense state and manifests
    ckpt = Path(results["checkpoint"])
    assert (ckpt / "manifests" / "rank0.json").is_file() and (ckpt / "manifests" / "rank1.json").is_file()
    assert (ckpt / "table" / ".metadata").is_file() and (ckpt / "dense").is_dir()
    # served embeddings: every item once, across both ranks' files; one row per evaluated user
    # the smoke config's raw string ids went through the vocabulary: every row once, with its raw id
    num_items = results["config"]["model"]["num_items"]
    assert results["data"]["vocab"] and num_items == results["data"]["vocab_summary"]["items"] <= 200
    items = pq.read_table(out / "embeddings" / "items")
    assert sorted(items.column("item_id").to_pylist()) == list(range(1, num_items + 1))
    assert all(raw.startswith("sku-") for raw in items.column("raw_item_id").to_pylist())
    users = pq.read_table(out / "embeddings" / "users")
    assert all(raw.startswith("user-") for raw in users.column("raw_user_id").to_pylist())
    assert users.num_rows == results["data"]["num_eval_queries"]
    assert users.schema.field("embedding").type.list_size == 16


def test_resume_continues_exactly(two_workers, tmp_path):
    _, full = two_workers
    first = run(small_config(tmp_path, "training.epochs=1"))
    assert first["throughput"]["epochs_completed"] == 1
    resumed = run(small_config(tmp_path), resume=True)
    assert resumed["throughput"]["epochs_completed"] == 2
    for key, value in full["metrics"].items():
        assert resumed["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_resume_on_other_worker_counts_and_shardings(two_workers, tmp_path):
    """2 workers stop mid-epoch at step 6; from that checkpoint (a) 1 worker table-wise to step 20, then 2
    workers row-wise to the end; (b) 3 workers to the end. Each load reshards the table and its optimizer
    state and is checked against the saved checksums (a mismatch fails the run); the data position is global,
    so the chains train exactly the target events of the uninterrupted run. Their metrics are close, not
    equal, to it: after the switch the global batches (and negatives) differ, so the models differ like two
    runs at different worker counts (test_one_worker_matches_two): HR@50 within 0.1 on ~300 queries."""
    _, full = two_workers
    a, b = tmp_path / "a", tmp_path / "b"
    first = run(small_config(a, "training.max_steps=6"))
    assert first["throughput"]["steps"] == 6 and first["throughput"]["epochs_completed"] == 0
    shutil.copytree(a, b)
    one = run(small_config(a, "distributed.num_workers=1", "distributed.sharding=table_wise",
                           "training.max_steps=20"), resume=True)
    two = run(small_config(a), resume=True)
    three = run(small_config(b, "distributed.num_workers=3"), resume=True)
    assert [r["throughput"]["restored_from_workers"] for r in (one, two, three)] == [2, 1, 2]
    assert [r["world_size"] for r in (one, two, three)] == [1, 2, 3]
    events = [r["throughput"]["events"] for r in (first, one, two, three)]
    assert events[0] + events[1] + events[2] == full["throughput"]["events"]  # nothing skipped or repeated
    assert events[0] + events[3] == full["throughput"]["events"]
    for resumed in (two, three):
        assert resumed["throughput"]["epochs_completed"] == 2
        assert resumed["metrics"]["hr@50"] == pytest.approx(full["metrics"]["hr@50"], abs=0.1)


def test_long_sequence_point_through_the_trainer(tmp_path):
    """ConvFormer-F with K = L = 2048 and activation checkpointing through the whole trainer, on histories of
    3,000 events whose repeats sit 300-600 back: the long-sequence path at CI size (the speed and memory at
    8192-32768 are benchmarks/long_sequence.py's). Evaluation encodes 2048-event histories in batches of 4."""
    results = run(small_config(
        tmp_path, "data.synth.users=12", "data.synth.events_per_user=3000", "data.synth.events_sigma=0",
        "data.synth.lag_min=300", "data.synth.lag_max=600", "data.synth.p_repeat=0.5", "data.synth.p_transition=0.1",
        "model.max_seq_len=2048", "model.kernel_size=2048", "model.mixer=fft", "training.batch_size=2",
        "training.max_steps=4", "training.loss.num_negatives=16", "eval.batch_size=4",
        "distributed.activation_checkpointing=true", "distributed.num_workers=1"))
    assert results["throughput"]["steps"] == 4 and results["throughput"]["events"] > 4 * 1000
    assert results["config"]["model"]["max_seq_len"] == 2048 and results["data"]["num_eval_queries"] == 12
    assert all(math.isfinite(v) for v in results["metrics"].values())
    assert results["peak_memory_bytes_per_worker"][0] > 0


def test_one_worker_matches_two(two_workers, tmp_path):
    out, two = two_workers
    one = run(small_config(tmp_path, "distributed.num_workers=1"))
    assert one["world_size"] == 1
    # different data splits per step, same data and seed: close, not identical
    assert _losses(tmp_path)[-1] == pytest.approx(_losses(out)[-1], rel=0.15)
    assert one["metrics"]["hr@50"] == pytest.approx(two["metrics"]["hr@50"], abs=0.1)


def test_rerun_without_resume_is_refused(two_workers):
    out, _ = two_workers
    with pytest.raises(ValueError, match="--resume"):
        run(small_config(out))


# ---------------------------------------------------------------- reliability


def test_killed_worker_is_recovered_from_the_latest_checkpoint(two_workers, tmp_path):
    _, reference = two_workers
    results = run(small_config(tmp_path, "training.max_failures=1", "output.checkpoint_every=5",
                               "debug.kill_at_step=8", "debug.kill_rank=1"))
    assert results["throughput"]["restored_from_checkpoint"]
    # restored at step 5 with the loader's position: no batch skipped or repeated, so the same model
    for key, value in reference["metrics"].items():
        assert results["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_crash_while_saving_leaves_the_previous_checkpoint(two_workers, tmp_path):
    _, reference = two_workers
    results = run(small_config(tmp_path, "training.max_failures=1", "output.checkpoint_every=5",
                               "debug.kill_at_step=10", "debug.kill_rank=1",
                               "debug.kill_in_save=true"))
    # rank 1 died halfway through uploading step 10's checkpoint: the half-written directory is in storage,
    # was never registered, and fails verification; training resumed from step 5 and reached the same model
    assert results["throughput"]["restored_from_checkpoint"]
    partial = []
    for d in (tmp_path / "ray" / "train").glob("checkpoint_*/"):
        try:
            verify(d, 2)
        except CheckpointError:
            partial.append(d)
    assert len(partial) == 1 and str(partial[0]) != results["checkpoint"]
    for key, value in reference["metrics"].items():
        assert results["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    with pytest.raises(Exception, match="non-finite loss at step 3"):
        run(small_config(tmp_path, "debug.nan_at_step=3", "training.epochs=1"))
    assert latest_checkpoint(tmp_path / "ray" / "train") is None  # nothing was saved from that state


def test_nonfinite_loss_can_skip_the_batch(tmp_path):
    results = run(small_config(tmp_path, "debug.nan_at_step=3", "training.epochs=1",
                               "training.on_nonfinite_loss=skip"))
    assert results["throughput"]["skipped_steps"] == 1
    assert all(math.isfinite(v) for v in results["metrics"].values())


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return latest_checkpoint(dst / "ray" / "train")


def test_corrupt_checkpoint_is_refused_before_loading(two_workers, tmp_path):
    out, _ = two_workers
    ckpt = _copy_run(out, tmp_path / "run")
    shard = next((ckpt / "table").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"corrupt: table/{shard.name}"):
        run(small_config(tmp_path / "run"), resume=True)


def test_incomplete_checkpoint_is_refused(two_workers, tmp_path):
    out, _ = two_workers
    ckpt = _copy_run(out, tmp_path / "run")
    (ckpt / "manifests" / "rank1.json").unlink()  # as if rank 1 died while saving
    with pytest.raises(CheckpointError, match="incomplete: rank1.json from rank 1 is missing"):
        run(small_config(tmp_path / "run"), resume=True)


def test_checkpoint_from_an_incompatible_config_is_refused(two_workers, tmp_path):
    out, _ = two_workers
    _copy_run(out, tmp_path / "run")
    with pytest.raises(ValueError, match="incompatible config .*model.dim: checkpoint 16, config 8"):
        run(small_config(tmp_path / "run", "model.dim=8"), resume=True)


def test_more_workers_than_cpus_is_refused(two_workers, tmp_path):
    with pytest.raises(ValueError, match=r"distributed.num_workers=64 .* needs 64 CPUs"):
        run(small_config(tmp_path, "distributed.num_workers=64", "distributed.cpus_per_worker=1"))


def test_missing_data_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="log directory does not exist"):
        run(small_config(tmp_path, f"data.path={tmp_path / 'nope'}"))


def test_item_ids_beyond_the_table_are_refused(tmp_path):
    log = generate(SynthConfig(users=40, items=200, days=3, workers=1), tmp_path / "log")
    with pytest.raises(ValueError, match=r"model.num_items=100 is smaller than the largest item id 200"):
        run(small_config(tmp_path / "out", f"data.path={log}", "model.num_items=100"))



# ---------------------------------------------------------------- leave-one-out (MovieLens protocol)


def _tiny_movielens(path: Path, users: int = 200, items: int = 100, events: int = 25) -> Path:
    """A u.data file (user, item, rating, unix seconds) with a learnable order: mostly item -> item + 1."""
    rng = np.random.default_rng(0)
    lines = []
    for u in range(1, users + 1):
        item, t = int(rng.integers(1, items + 1)), 880_000_000 + int(rng.integers(0, 10**6))
        for _ in range(events):
            lines.append(f"{u}\t{item}\t4\t{t}")
            item = item % items + 1 if rng.random() < 0.8 else int(rng.integers(1, items + 1))
            t += int(rng.integers(1, 5000))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_leave_one_out_selects_on_validation_and_beats_popularity(tmp_path):
    convert(_tiny_movielens(tmp_path / "u.data"), tmp_path / "log")
    results = run(load_config("configs/smoke.yaml", [
        f"data.path={tmp_path / 'log'}", "data.split=leave_one_out", "data.backend=arrow", "model.num_items=100",
        "model.dim=16", "model.max_seq_len=20", "model.kernel_size=20", "training.batch_size=32",
        "training.epochs=4", "training.loss.num_negatives=32", "eval.ks=[10,50]", "eval.exclude_seen=true",
        "eval.select=ndcg@10", "eval.patience=2", "distributed.num_workers=2", f"output.dir={tmp_path / 'out'}",
    ]))
    assert results["data"]["num_eval_queries"] == results["data"]["num_valid_queries"] == 200  # every user
    selection = results["validation"]
    valid = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in valid if "valid/ndcg@10" in r]
    # every epoch: 4 epochs of about 4 steps never reach eval.patience_steps (200) past the best validation
    assert len(valid) == results["throughput"]["epochs_completed"] == 4 and not selection["stopped_early"]
    best = max(valid, key=lambda r: r["valid/ndcg@10"])  # the epoch chosen is the best on validation
    assert selection["best_epoch"] == best["epoch"] and selection["metrics"]["ndcg@10"] == best["valid/ndcg@10"]
    pop = results["baselines"]["popularity"]
    assert results["metrics"]["hr@10"] > 2 * pop["hr@10"] and results["metrics"]["ndcg@10"] > 2 * pop["ndcg@10"]
