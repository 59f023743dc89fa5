"""MLflow tracking (output.mlflow_uri, trainer/driver/tracking.py), issue #16: a run fed with metrics.jsonl
records and the results, read back through MLflow's own client from a file store under tmp_path; a failed run;
the trackers the driver builds from a config; URIs the config refuses. No Ray."""

import json

import pytest

from tests.helpers import RECORDS, RESULTS, read_scalars
from trainer.config import load_config
from trainer.driver.tracking import CURVES, MLflow, Trackers, build_trackers
from trainer.errors import ConfigError, UserError


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)  # a fresh client: what was stored, not what the tracker holds


def _only_run(uri, experiment="convformer"):
    client = _client(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_mlflow_run_from_records_and_results(tmp_path):
    uri = (tmp_path / "mlruns").as_uri()
    cfg = load_config(None, ["model.dim=48", "training.lr=3e-4"])
    # 120 extra keys: more params than MLflow takes in one batch (100); one value over its length limit
    params = {**cfg.to_dict(), "extra": {f"k{i:03d}": i for i in range(120)}, "note": "x" * 7000}
    tracker = MLflow(uri, "convformer", "smoke", params, tags={"convformer.output_dir": str(tmp_path)})
    for r in RECORDS:
        tracker.record(r)
    (tmp_path / CURVES).write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    tracker.finish(RESULTS, [tmp_path / CURVES, tmp_path / "results.json", tmp_path / "missing.txt"])

    client, run = _only_run(uri)
    assert run.info.run_id == tracker.run_id and run.info.run_name == "smoke"
    assert run.info.status == "FINISHED" and run.data.tags["convformer.output_dir"] == str(tmp_path)
    p = run.data.params
    assert p["model.dim"] == "48" and p["training.lr"] == "0.0003" and p["eval.ks"] == "[1, 5, 10, 20, 50, 100]"
    assert p["output.mlflow_uri"] == "" and p["extra.k119"] == "119"
    assert len(p["note"]) <= 6000 and p["note"].endswith("[truncated]")

    def history(name):
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]

    assert history("train/loss") == [(5, 5.0), (10, 4.5), (15, 4.0)]
    assert [m.timestamp for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1000, 2000, 4000]
    assert history("train/lr_dense") == [(5, 1e-4), (10, 5e-4), (15, 1e-3)]
    assert history("train/lr_sparse") == [(5, 0.05), (10, 0.05), (15, 0.04)]
    assert history("valid/ndcg_10") == [(10, 0.25), (20, 0.3)]
    m = run.data.metrics  # the latest value of each
    assert m["heldout/hr_10"] == 0.6 and m["heldout/ndcg_10"] == 0.31
    assert m["baseline/popularity/hr_10"] == 0.3 and "baseline/popularity/eval_day" not in m
    assert m["throughput/events_per_s"] == 1150.0
    assert history("heldout/hr_10") == [(20, 0.6)]
    assert not any(name.startswith("lr/") or "@" in name for name in m)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == [CURVES, "results.json"]


def test_failed_run_ends_failed_and_the_experiment_is_reused(tmp_path):
    uri = str(tmp_path / "mlruns")  # a plain path: a file store there
    first = MLflow(uri, "exp", "a", {"training": {"lr": 0.001}})
    first.record(RECORDS[0])
    first.close()
    first.close()  # once ended, nothing more
    second = MLflow(uri, "exp", "b", {})
    second.finish({})
    client = _client((tmp_path / "mlruns").as_uri())
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("exp").experiment_id])}
    assert runs["a"].info.status == "FAILED" and runs["b"].info.status == "FINISHED"
    assert [(x.step, x.value) for x in client.get_metric_history(runs["a"].info.run_id, "train/loss")] == [(5, 5.0)]


def test_driver_trackers_from_the_config(tmp_path):
    out = tmp_path / "run"
    uri = (tmp_path / "mlruns").as_uri()
    cfg = load_config(None, [f"output.dir={out}", f"output.mlflow_uri={uri}", "output.mlflow_experiment=team"])
    trackers = Trackers(build_trackers(cfg, out))
    assert [type(t).__name__ for t in trackers.trackers] == ["TensorBoard", "MLflow"]
    for r in RECORDS:
        trackers.record(r)
    trackers.finish(RESULTS, [])
    assert read_scalars(out / "tb")["train/lr_dense"][-1][0] == 15
    _, run = _only_run(uri, "team")
    assert run.info.run_name == "run" and run.data.params["output.mlflow_experiment"] == "team"
    assert run.data.metrics["train/lr_sparse"] == pytest.approx(0.04)

    off = load_config(None, [f"output.dir={out}", "output.tensorboard=false"])
    assert build_trackers(off, out) == []


def test_one_failing_tracker_does_not_skip_the_others(tmp_path):
    class Broken:
        def record(self, r):
            raise OSError("disk full")

        def close(self):
            raise OSError("disk full")

    uri = (tmp_path / "mlruns").as_uri()
    trackers = Trackers([Broken(), MLflow(uri, "convformer", "r", {})])
    with pytest.raises(OSError, match="disk full"):
        trackers.record(RECORDS[0])
    trackers.close()  # after a training failure: raises nothing, so the training error is the one reported
    client, run = _only_run(uri)
    assert client.get_metric_history(run.info.run_id, "train/loss")[0].value == 5.0
    assert run.info.status == "FAILED"


def test_a_store_that_cannot_be_opened_is_a_user_error_before_training(tmp_path):
    (tmp_path / "not-a-dir").write_text("x")
    cfg = load_config(None, [f"output.mlflow_uri={tmp_path / 'not-a-dir'}", "output.tensorboard=false"])
    with pytest.raises(UserError, match="output.mlflow_uri="):
        build_trackers(cfg, tmp_path / "run")


@pytest.mark.parametrize("uri", ["file://relative/mlruns", "http://", "ftp://host/x", "s3://bucket/mlruns",
                                 "sqlite:///mlflow.db", " /tmp/mlruns"])
def test_a_bad_mlflow_uri_is_refused_by_the_config(uri):
    with pytest.raises(ConfigError, match="output.mlflow_uri="):
        load_config(None, [f"output.mlflow_uri='{uri}'"])


@pytest.mark.parametrize("uri", ["/abs/mlruns", "runs/mlruns", "file:///abs/mlruns", "http://mlflow:5000",
                                 "https://mlflow.example.com", "databricks"])
def test_good_mlflow_uris_are_accepted(uri):
    assert load_config(None, [f"output.mlflow_uri={uri}"]).output.mlflow_uri == uri


def test_an_empty_experiment_is_refused_when_mlflow_is_on():
    with pytest.raises(ConfigError, match="output.mlflow_experiment"):
        load_config(None, ["output.mlflow_uri=/tmp/mlruns", "output.mlflow_experiment=''"])
