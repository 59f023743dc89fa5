"""The export of a real run (trainer/export.py): a small 2-worker run with ZeRO 1 that writes OUT/model at
its end, then `python -m trainer.export` from its checkpoint; both directories reproduce the run's held-out
metrics exactly in one process, and serve raw ids."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import small_run_config
from trainer import export, recommend
from trainer.driver.launch import run
from trainer.serving import model_dir as md
from trainer.serving.heldout import heldout_metrics
from trainer.serving.onnx_export import onnx_session, run_onnx

pytestmark = pytest.mark.ray_train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    results = run(small_run_config(out, "output.export_model=true", "distributed.zero_stage=1"))
    return out, results


def _metrics(model: md.ServingModel) -> dict:
    e = model.meta.eval
    return heldout_metrics(model, e["queries"], e["ks"], e["exclude_seen"], model.meta.source["world_size"],
                           e["batch_size"])


def test_end_of_run_and_checkpoint_exports_reproduce_the_heldout_metrics(trained, tmp_path, capsys):
    out, results = trained
    at_end = md.load(out / "model")
    assert at_end.meta.source["kind"] == "run_end" and len(list((out / "model" / "items").iterdir())) == 2
    assert _metrics(at_end) == results["metrics"]  # exactly: the same batches, order and sums as the workers

    assert export.main([str(out), "--out", str(tmp_path / "m")]) == 0
    assert "written" in capsys.readouterr().out
    exported = md.load(tmp_path / "m")
    # no validation split: the last checkpoint holds the evaluated weights, so both exports are equal
    source = exported.meta.source
    assert source["kind"] == "checkpoint" and source["step"] == results["throughput"]["steps"]
    assert torch.equal(exported.items, at_end.items)
    assert all(torch.equal(v, at_end.encoder.state_dict()[k]) for k, v in exported.encoder.state_dict().items())
    assert _metrics(exported) == results["metrics"]

    # the run's served item embeddings (Trainer.export) agree; raw ids came through the vocabulary
    assert exported.raw_ids.to_pylist()[:3] == [r for r in exported.raw_of([1, 2, 3])]
    assert all(raw.startswith("sku-") for raw in exported.raw_ids.to_pylist())
    counts = np.load(results["data"]["item_counts"])
    assert np.array_equal(exported.counts[: len(counts)], counts)

    # the ONNX user tower written by the export, on the run's own held-out histories
    hist = pq.read_table(results["data"]["eval_queries"]).column("history").to_pylist()[:64]
    rows = torch.zeros(len(hist), exported.meta.model.max_seq_len, dtype=torch.long)
    for i, h in enumerate(hist):
        h = h[-rows.shape[1]:]
        rows[i, rows.shape[1] - len(h):] = torch.tensor(h, dtype=torch.long)
    session = onnx_session(tmp_path / "m" / md.ONNX)
    err = np.abs(run_onnx(session, rows.numpy()) - exported.user_vectors(rows).numpy()).max()
    assert err <= 1e-5, err

    # recommend on raw ids, end to end through main
    raw = exported.raw_of([5, 9, 2])
    assert recommend.main([str(tmp_path / "m"), "--history", " ".join(raw) + " not-an-item", "--k", "5"]) == 0
    got = capsys.readouterr()
    lines = got.out.splitlines()
    assert len(lines) == 5 and not {line.split("\t")[0] for line in lines} & set(raw)
    assert "not-an-item" in got.err


def test_export_refuses_what_is_not_a_run(trained, tmp_path, capsys):
    out, _ = trained
    assert export.main([str(tmp_path / "none"), "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text(json.dumps({"world_size": 2}))
    assert export.main([str(tmp_path / "bad"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert export.main([str(out / "model"), "--out", str(tmp_path / "m2")]) == 2  # a model dir is no run
    capsys.readouterr()
    # a corrupt checkpoint is refused before anything is read
    copy = shutil.copytree(out, tmp_path / "copy", ignore=shutil.ignore_patterns("model"))
    ckpt = Path(json.loads((copy / "results.json").read_text())["checkpoint"].replace(str(out), str(copy)))
    results = json.loads((copy / "results.json").read_text())
    results["checkpoint"] = str(ckpt)
    (copy / "results.json").write_text(json.dumps(results))
    shard = next((ckpt / "table").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])
    assert export.main([str(copy), "--out", str(tmp_path / "m3")]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err or "incomplete" in err, err
    assert not (tmp_path / "m3").exists()
