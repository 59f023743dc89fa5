"""Cluster operation through real Ray: a local head (cluster.local), a job submitted to it (cluster.submit),
and a 2-node cluster on this machine with one training worker per node.

Shared runs (a few minutes on 2 cores): one head, one submitted job (the single-node reference), one
2-node training run. Heads are stopped by their own process group, never by `ray stop`."""

import json
import shutil
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from cluster import local, submit
from trainer.config import load_config

# tests/test_train.py's small config (one epoch here): a tiny synthetic log and model, 2 workers.
SMALL = [
    "data.synth.users=300", "data.synth.items=200", "data.synth.days=4", "data.synth.events_per_user=60",
    "data.backend=arrow", "model.num_items=200", "model.dim=16", "model.max_seq_len=20", "model.kernel_size=20",
    "training.batch_size=32", "training.epochs=1", "training.log_every=5", "training.loss.num_negatives=32",
    "eval.ks=[1,10,50]", "distributed.num_workers=2",
    "eval.popularity_baseline=false", "eval.oracle=false",  # not compared here: save their time
]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}

pytestmark = pytest.mark.ray_train


@pytest.fixture(scope="module")
def head():
    temp_dir = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")  # short: Ray's socket paths live under it
    port, dashboard_port = local.free_port(), local.free_port()
    with pytest.MonkeyPatch.context() as mp:  # a plain shell: no DS_ACCELERATOR for the head or its workers
        mp.delenv("DS_ACCELERATOR", raising=False)
        rc = local.main(["start", "--port", str(port), "--dashboard-port", str(dashboard_port), "--num-cpus", "2",
                         "--object-store-gib", "0.5", "--temp-dir", temp_dir])
    assert rc == 0
    h = local.read_state(temp_dir)
    yield h
    local.stop(temp_dir)  # no-op if test_stop_ends_the_head already stopped it
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted(head, tmp_path_factory):
    storage = tmp_path_factory.mktemp("storage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_JOB_TOKEN_FILE", str(local.token_path(head.temp_dir)))
        mp.delenv("RAY_JOB_TOKEN", raising=False)
        mp.delenv("DS_ACCELERATOR", raising=False)  # as from a plain shell
        rc = submit.main(["--address", head.job_address, "--config", "configs/smoke.yaml", "--storage",
                          str(storage), "--job-id", "test-smoke", *SMALL])
    return rc, storage / "test-smoke"


@pytest.mark.parametrize("value", [None, "", "cpu", "cuda"])
def test_submit_never_forwards_ds_accelerator(monkeypatch, value):
    """DeepSpeed refuses an empty DS_ACCELERATOR, and `cpu` would move a GPU worker's tower to the CPU: the
    submitting shell's value never reaches the job; each worker sets it from its device."""
    if value is None:
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    else:
        monkeypatch.setenv("DS_ACCELERATOR", value)
    assert "DS_ACCELERATOR" not in submit.runtime_env("image")["env_vars"]


def test_local_head_is_up_on_loopback_only(head, capfd):
    assert local.job_server_up(head)
    assert local.main(["status", "--temp-dir", head.temp_dir]) == 0
    assert "CPU" in capfd.readouterr().out  # `ray status` reached the GCS with the head's token
    listening = [
        c.laddr for pid in local._group_pids(head.pgid) for c in psutil.Process(pid).net_connections("inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert any(a.port == head.port for a in listening) and any(a.port == head.dashboard_port for a in listening)
    assert {a.ip for a in listening} <= LOOPBACK, listening


def test_job_server_refuses_calls_without_the_token(head, monkeypatch):
    monkeypatch.delenv("RAY_JOB_TOKEN", raising=False)
    monkeypatch.delenv("RAY_JOB_TOKEN_FILE", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(Exception, match="(?i)auth|401|token"):
        submit.client(head.job_address).list_jobs()


def test_submitted_job_trains_on_the_head_and_returns_results(head, submitted):
    rc, out = submitted
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["config"]["model"]["dim"] == 16
    assert results["config"]["output"]["dir"] == str(out)
    m = results["metrics"]
    assert 0 <= m["hr@1"] <= m["hr@10"] <= m["hr@50"] <= 1 and m["hr@50"] > 0.3
    assert Path(results["checkpoint"]).is_dir()
    # the job's driver joined this head (RAY_ADDRESS) rather than starting its own Ray: its training
    # workers logged into the head's session (until they moved their output to OUT/logs/worker-RANK.log)
    logs = Path(head.temp_dir) / "session_latest" / "logs"
    moved = [f"output continues in {out / 'logs' / f'worker-{rank}.log'}" for rank in (0, 1)]
    assert all(any(m in p.read_text(errors="replace") for p in logs.glob("worker-*.out")) for m in moved)
    assert "epoch" in (out / "logs" / "worker-0.log").read_text()


def test_job_upload_excludes_venv_outputs_and_git(head, submitted):
    pkgs = [p for p in (Path(head.temp_dir) / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
            if p.is_dir()]
    assert len(pkgs) == 1
    files = [p for p in pkgs[0].rglob("*") if p.is_file()]
    assert (pkgs[0] / "trainer" / "train.py").is_file() and (pkgs[0] / "configs" / "smoke.yaml").is_file()
    top = {p.relative_to(pkgs[0]).parts[0] for p in files}
    assert not top & {".venv", ".git", "runs", "datasets", "data_cache", ".pytest_cache"}, top
    assert not any(p.suffix in (".parquet", ".pyc") for p in files)
    assert sum(p.stat().st_size for p in files) < 5 * 2**20


def test_job_status_logs_and_list(head, submitted, capsys, monkeypatch):
    monkeypatch.setenv("RAY_JOB_TOKEN_FILE", str(local.token_path(head.temp_dir)))
    assert submit.main(["status", "--address", head.job_address, "test-smoke"]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert submit.main(["logs", "--address", head.job_address, "test-smoke"]) == 0
    assert submit.RESULTS_MARKER in capsys.readouterr().out
    assert submit.main(["list", "--address", head.job_address]) == 0
    assert "test-smoke" in capsys.readouterr().out


def test_stop_ends_the_head(head):
    pids = local._group_pids(head.pgid)
    assert pids and local.stop(head.temp_dir)
    assert not local._group_pids(head.pgid)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert not local.job_server_up(head)
    assert local.main(["status", "--temp-dir", head.temp_dir]) == 1
    assert not local.stop(head.temp_dir)  # stopping twice is harmless


# ---------------------------------------------------------------- two nodes on one machine


def _watch_placement(stop: threading.Event, seen: list) -> None:
    import ray

    while not stop.is_set():
        for pg in ray.util.placement_group_table().values():
            nodes = pg.get("bundles_to_node_id") or {}
            if pg.get("strategy") == "SPREAD" and len(nodes) == 2 and pg not in seen:
                seen.append(pg)
        stop.wait(1.0)


@pytest.fixture(scope="module")
def two_nodes(submitted, tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    from trainer.driver.launch import run

    ray.shutdown()  # other test modules may have left a local instance in this process
    node_args = {"num_cpus": 2, "object_store_memory": 256 * 2**20}  # 2 logical CPUs: Ray Data keeps one
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    try:
        cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        out = tmp_path_factory.mktemp("two-nodes")
        seen: list = []
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_placement, args=(stop, seen), daemon=True)
        watcher.start()
        try:
            results = run(load_config("configs/smoke.yaml", [*SMALL, f"output.dir={out}",
                                                             "distributed.placement=spread"]))
        finally:
            stop.set()
            watcher.join()
        yield results, node_ids, seen
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_two_nodes_one_worker_each_matches_single_node(two_nodes, submitted):
    results, node_ids, placements = two_nodes
    assert len(node_ids) == 2
    assert placements, "no 2-bundle SPREAD placement group seen during training"
    assert set(placements[0]["bundles_to_node_id"].values()) == node_ids  # one worker on each node
    assert results["world_size"] == 2
    single = json.loads((submitted[1] / "results.json").read_text())
    for key in ("hr@10", "hr@50", "mrr", "ndcg@10"):
        assert results["metrics"][key] == pytest.approx(single["metrics"][key], abs=0.05), key
