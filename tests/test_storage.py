"""output.storage: checkpoints and results in a local directory or a pyarrow URI (issue #5).

The end-to-end test runs the trainer against a real S3 endpoint (moto's server on 127.0.0.1, over HTTP,
tests/objectstore.py), takes the endpoint down in the middle of a checkpoint upload, then resumes from the
store with a fresh output.dir (about two minutes on 2 cores).
The rest are unit tests of the storage helpers, the checkpoint checks through a URI, Ray's download of a
checkpoint from a non-local filesystem, and cluster.submit with a URI --storage (a fake job client)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tests.helpers import ROOT, SMALL
from tests.objectstore import ObjectStore, Outage
from trainer import storage
from trainer.checkpoint import (
    CheckpointError,
    check_resumable,
    fingerprint,
    latest_checkpoint,
    read_meta,
    verify,
    write_manifest,
)
from trainer.config import load_config


def _config(out: Path, *overrides: str):
    return load_config("configs/smoke.yaml", [*SMALL, f"output.dir={out}", *overrides])


# ---------------------------------------------------------------- config and locations


@pytest.mark.parametrize("value, message", [
    ("nosuch://bucket/x", "Unrecognized filesystem type"),
    ("file://relative/x", "hostname"),
])
def test_storage_pyarrow_cannot_open_is_refused_naming_key_and_value(tmp_path, value, message):
    refused = rf"output.storage='{value}' is not a storage location pyarrow can open: .*{message}"
    with pytest.raises(ValueError, match=refused):
        _config(tmp_path, f"output.storage={value}")


@pytest.mark.parametrize("value", ["", "runs/store", "/mnt/shared/store", "file:///tmp/store", "gs://bucket/runs/x",
                                   "s3://bucket/runs/x?region=eu-west-1"])
def test_storage_accepts_paths_and_uris(tmp_path, value):
    assert _config(tmp_path, f"output.storage={value}").output.storage == value


def test_locations_keep_their_kind():
    assert storage.join(Path("/a/b"), "train", "ck") == Path("/a/b/train/ck")
    assert storage.join("s3://bkt/runs/x/", "train", "ck") == "s3://bkt/runs/x/train/ck"
    assert storage.join("s3://bkt/x?region=eu-west-1", "train") == "s3://bkt/x/train?region=eu-west-1"
    assert storage.name_of("file:///data/store/train", "/data/store/train/checkpoint_1") == \
        "file:///data/store/train/checkpoint_1"
    assert storage.name_of(Path("/data/store/train"), "/data/store/train/checkpoint_1") == \
        Path("/data/store/train/checkpoint_1")
    assert storage.location("rel/dir") == Path("rel/dir").resolve() and storage.location("gs://b/x") == "gs://b/x"


def test_write_results_copies_to_the_storage_uri(tmp_path):
    from trainer.driver.report import write_results

    write_results({"metrics": {"hr@10": 0.5}}, tmp_path / "out", also_to=f"file://{tmp_path}/store/run")
    local = json.loads((tmp_path / "out" / "results.json").read_text())
    assert json.loads((tmp_path / "store" / "run" / "results.json").read_text()) == local == {"metrics": {"hr@10": 0.5}}
    assert not list(tmp_path.rglob("*.tmp"))


# ---------------------------------------------------------------- checkpoint checks through a URI


def _fake_run(root: Path, cfg, world: int = 2, **meta_extra) -> Path:
    """A Ray Train run directory as the trainer leaves it: one registered checkpoint of `world` ranks."""
    ckpt = root / "train" / "checkpoint_2026-01-01_00-00-00.000000"
    for rank in range(world):  # ranks write into their own directories; Ray merges them in storage
        part = root / f"rank{rank}"
        (part / "table").mkdir(parents=True)
        (part / "table" / f"__{rank}_0.distcp").write_bytes(bytes(range(256)) * (rank + 3))
        (part / "loader").mkdir()
        (part / "loader" / f"rank{rank}.json").write_text('{"epoch": 1}')
        if rank == 0:
            meta = {"fingerprint": fingerprint(cfg), "world_size": world, "step": 10, "epoch": 1, **meta_extra}
            (part / "meta.json").write_text(json.dumps(meta))
        write_manifest(part, rank)
        pafs.copy_files(str(part), str(ckpt))
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": ckpt.name}}
    (root / "train" / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    return ckpt


def test_checkpoint_checks_read_a_uri(tmp_path):
    cfg = _config(tmp_path / "out")
    ckpt = _fake_run(tmp_path / "store", cfg)
    run_uri = f"file://{tmp_path}/store/train"
    assert latest_checkpoint(run_uri) == f"file://{ckpt}"
    assert check_resumable(run_uri, cfg) == f"file://{ckpt}"
    assert latest_checkpoint(tmp_path / "store" / "train") == ckpt  # a local path still answers a Path
    assert latest_checkpoint(f"file://{tmp_path}/nothing/train") is None


def test_corrupt_file_is_found_through_the_uri(tmp_path):
    cfg = _config(tmp_path / "out")
    ckpt = _fake_run(tmp_path / "store", cfg)
    shard = ckpt / "table" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the CRC-32 over the stream finds it
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"checkpoint file://{ckpt} is corrupt: table/__1_0.distcp \(rank 1\)"):
        check_resumable(f"file://{tmp_path}/store/train", cfg)


def test_incomplete_and_incompatible_checkpoints_are_refused_through_the_uri(tmp_path):
    cfg = _config(tmp_path / "out")
    ckpt = _fake_run(tmp_path / "store", cfg)
    run_uri = f"file://{tmp_path}/store/train"
    with pytest.raises(ValueError, match="incompatible config .*model.dim: checkpoint 16, config 8"):
        check_resumable(run_uri, _config(tmp_path / "out", "model.dim=8"))
    (ckpt / "loader" / "rank1.json").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: loader/rank1.json \(rank 1\) is missing"):
        check_resumable(run_uri, cfg)
    (ckpt / "manifests" / "rank1.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: rank1.json from rank 1 is missing"):
        verify(f"file://{ckpt}", 2)
    (ckpt / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: meta.json from rank 0 is missing"):
        check_resumable(run_uri, cfg)


def test_ray_downloads_a_checkpoint_from_a_non_local_filesystem(tmp_path):
    """Checkpointer.load verifies `checkpoint.as_directory()`: for storage that is not LocalFileSystem
    (s3, gs, ...) Ray downloads the whole checkpoint, every rank's files, to a local directory first."""
    import ray.train

    cfg = _config(tmp_path / "out")
    ckpt = _fake_run(tmp_path / "store", cfg)
    remote = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())  # not a LocalFileSystem to Ray
    checkpoint = ray.train.Checkpoint(path=str(ckpt.relative_to(tmp_path)), filesystem=remote)
    with checkpoint.as_directory() as local:
        assert Path(local) != ckpt and not Path(local).is_relative_to(tmp_path)
        verify(Path(local), 2)
        assert sorted(p.relative_to(local) for p in Path(local).rglob("*") if p.is_file()) == \
            sorted(p.relative_to(ckpt) for p in ckpt.rglob("*") if p.is_file())
    assert not Path(local).exists()  # removed after use


# ---------------------------------------------------------------- cluster.submit with a URI --storage


class _FakeJobs:
    """A job client whose 'job' writes results.json where the trainer would: under output.storage."""

    def __init__(self) -> None:
        self.entrypoint = ""

    def submit_job(self, entrypoint: str, **kwargs) -> None:
        self.entrypoint = entrypoint
        stored = next(a.split("=", 1)[1] for a in shlex.split(entrypoint) if a.startswith("output.storage="))
        storage.write_bytes(storage.join(stored, "results.json"), b'{"metrics": {"hr@10": 0.25}}')

    async def tail_job_logs(self, job_id):
        return
        yield

    def get_job_status(self, job_id):
        return "JobStatus.SUCCEEDED"

    def get_job_logs(self, job_id):
        return ""


def test_submit_with_a_uri_storage_fetches_results_from_it(tmp_path, monkeypatch):
    from cluster import submit

    jobs = _FakeJobs()
    monkeypatch.setattr(submit, "client", lambda address: jobs)
    rc = submit.main(["--config", "configs/smoke.yaml", "--storage", f"file://{tmp_path}/bucket/runs", "--job-id", "j1",
                      "--output-dir", str(tmp_path / "shared"), "training.epochs=1"])
    assert rc == 0
    args = shlex.split(jobs.entrypoint)
    assert f"output.storage=file://{tmp_path}/bucket/runs/j1" in args and f"output.dir={tmp_path}/shared/j1" in args
    assert json.loads((tmp_path / "shared" / "j1" / "results.json").read_text()) == {"metrics": {"hr@10": 0.25}}


# ---------------------------------------------------------------- end to end through the real trainer


@pytest.fixture
def s3(monkeypatch):
    store = ObjectStore()
    for key, value in store.env.items():  # for this process's own reads of the store
        monkeypatch.setenv(key, value)
    yield store
    store.close()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    return subprocess.run([sys.executable, "-m", "trainer.train", "--config", "configs/smoke.yaml", *SMALL, *args],
                          cwd=ROOT, env=full, capture_output=True, text=True, timeout=600)


@pytest.mark.ray_train
def test_s3_holds_checkpoints_results_and_resume_through_an_outage_mid_upload(tmp_path, s3):
    """The trainer against a real S3 endpoint (moto's server over HTTP). The endpoint goes down in the
    middle of the second checkpoint's upload: the run ends with one error line, the checkpoint registered
    before is intact, and once the endpoint is back a fresh output.dir resumes from the store to the end."""
    from trainer.driver.launch import run

    uri = s3.uri("a")
    s3.endpoint.outage = Outage("a", checkpoint=2, puts=3)
    first = _cli(f"output.dir={tmp_path / 'out1'}", f"output.storage={uri}", env=s3.env)
    assert first.returncode == 2, first.stderr[-3000:]
    lines = first.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: uploading the checkpoint of step"), first.stderr[-3000:]
    assert "failed" in lines[0] and "--resume" in lines[0]
    s3.endpoint.come_back()
    run_dir = storage.join(uri, "train")
    started = sorted({k.split("/")[2] for k in s3.keys("a/train/checkpoint_") if k.count("/") >= 3})
    assert len(started) == 2  # the second checkpoint's upload began ...
    registered = latest_checkpoint(run_dir)
    assert registered is not None and started[0] in str(registered)  # ... but the first is the latest
    verify(registered, read_meta(registered)["world_size"])  # complete and intact
    assert not (tmp_path / "out1" / "ray").exists()

    with pytest.raises(ValueError, match="holds an earlier run; pass --resume"):
        run(_config(tmp_path / "out2", f"output.storage={uri}"))

    # a fresh output.dir (another machine, say) continues from the checkpoint in the store
    second = _cli(f"output.dir={tmp_path / 'out2'}", f"output.storage={uri}", "--resume", env=s3.env)
    assert second.returncode == 0, second.stderr[-3000:]
    results = json.loads((tmp_path / "out2" / "results.json").read_text())
    tp = results["throughput"]
    assert tp["restored_from_checkpoint"] and tp["epochs_completed"] == 2
    assert json.loads(s3.read("a/results.json"))["metrics"] == results["metrics"]
    assert s3.read("a/metrics.jsonl").decode() == (tmp_path / "out2" / "metrics.jsonl").read_text()
    logged = [json.loads(line) for line in s3.read("a/metrics.jsonl").decode().splitlines()]
    assert [r["checkpoint"] for r in logged if "checkpoint" in r][0] == str(registered)  # both runs' reports
    assert results["checkpoint"].startswith(storage.join(uri, "train").split("?")[0] + "/checkpoint_")
    final = latest_checkpoint(run_dir)
    assert results["checkpoint"] == str(final)
    verify(final, 2)
    name = str(final).split("/train/")[1].split("?")[0]
    assert f"a/train/{name}/manifests/rank1.json" in s3.keys(f"a/train/{name}/")  # in the bucket, seen by boto3


def test_another_vocabulary_or_an_old_checkpoint_on_another_world_is_refused(tmp_path):
    cfg = _config(tmp_path / "out")
    sha = "ab" * 32
    _fake_run(tmp_path / "store", cfg, vocabulary=sha)
    run_uri = f"file://{tmp_path}/store/train"
    assert check_resumable(run_uri, cfg, sha) is not None
    with pytest.raises(ValueError, match=r"the item vocabulary \(data/vocab\): checkpoint sha256 abababababab, "
                                         r"data sha256 cdcdcdcdcdcd"):
        check_resumable(run_uri, cfg, "cd" * 32)
    with pytest.raises(ValueError, match="checkpoint sha256 abababababab, data dense ids"):
        check_resumable(run_uri, cfg, None)
    # written without dense_full.pt (as before resharding existed): only its own world size loads it
    with pytest.raises(CheckpointError, match="without dense_full.pt; resume it with distributed.num_workers=2"):
        check_resumable(run_uri, _config(tmp_path / "out", "distributed.num_workers=1"), sha)
