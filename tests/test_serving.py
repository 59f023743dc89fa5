"""Serving from a model directory (trainer/serving, trainer/recommend.py): loading, the ONNX user tower
against torch at every length, FAISS against brute force, recommend on raw ids. A tiny random model; the
export of a real run and its metrics are in tests/test_export.py."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from model.config import ModelConfig
from model.convformer import SequenceEncoder
from tests.helpers import ROOT
from trainer import recommend
from trainer.serving import model_dir as md
from trainer.serving.errors import ModelDirError
from trainer.serving.index import build_index, recall_at_k, search
from trainer.serving.onnx_export import export_onnx, onnx_session, run_onnx

NUM_ITEMS, DIM, SEQ = 300, 16, 12


def _write_model(out, mixer="fft", **kw):
    kw = {"num_layers": 1, **kw}
    cfg = ModelConfig(num_items=NUM_ITEMS, dim=DIM, max_seq_len=SEQ, mixer=mixer, kernel_size=SEQ,
                      dropout=0.0, conv_init_std=0.2, **kw)
    torch.manual_seed(0)
    encoder = SequenceEncoder(cfg)
    items = torch.randn(NUM_ITEMS, DIM)
    rows = np.arange(1, NUM_ITEMS + 1)
    counts = (NUM_ITEMS - rows) * 3 + 1  # row 1 the most popular
    raw = pa.array([f"sku-{r * 7}" for r in rows])
    md.write_items(out, 0, rows[:100], items[:100].numpy(), counts[:100], raw[:100])
    md.write_items(out, 1, rows[100:], items[100:].numpy(), counts[100:], raw[100:])  # two parts, as 2 ranks
    md.write_dense(out, encoder.state_dict())
    md.write_meta(out, md.ModelMeta(model=cfg, num_items=NUM_ITEMS, raw_id_type="string"), None)
    return encoder, items


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    encoder, items = _write_model(out)
    model = md.load(out)
    return out, model, encoder, items


@pytest.fixture(scope="module")
def onnx_model(served):
    out, model, _, _ = served
    return onnx_session(export_onnx(model))


def test_load_gives_back_what_was_written(served):
    _, model, encoder, items = served
    assert torch.equal(model.items[1:], items) and not model.items[0].any()
    for name, value in encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], value), name
    assert model.counts[1] == model.counts.max() and model.counts[0] == 0
    assert model.rows_of(["sku-7", "nope", "sku-2100"]) == ([1, 300], ["nope"])
    assert model.raw_of([1, 300]) == ["sku-7", "sku-2100"]


def test_a_missing_or_incomplete_model_dir_is_refused(tmp_path):
    with pytest.raises(ModelDirError, match="no such model directory"):
        md.load(tmp_path / "nope")
    with pytest.raises(ModelDirError, match="config.json is missing"):
        md.load(tmp_path)


def _onnx_error(model, session) -> float:
    """The largest |ONNX - torch| over user vectors of left-padded histories of every length 1..SEQ."""
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for length in range(1, SEQ + 1):
        hist = torch.randint(1, NUM_ITEMS + 1, (8, length), generator=gen)
        pads = torch.randint(0, length, (8,), generator=gen)
        hist[torch.arange(length)[None, :] < pads[:, None]] = 0  # left padding, at least one real event
        want = model.user_vectors(hist).numpy()  # the torch model as it runs: FFT mixer
        got = run_onnx(session, hist.numpy())
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def test_onnx_matches_torch_at_every_length(served, onnx_model):
    worst = _onnx_error(served[1], onnx_model)
    print(f"onnx max abs error over L=1..{SEQ}: {worst:.2e}")
    assert worst <= 1e-5


def test_onnx_matches_torch_with_pre_norm_blocks(tmp_path):
    encoder, _ = _write_model(tmp_path, block="pre_norm", num_layers=2)
    with torch.no_grad():  # a trained final LayerNorm, not the identity it starts as
        encoder.out_norm.weight.uniform_(0.5, 1.5)
        encoder.out_norm.bias.normal_()
    md.write_dense(tmp_path, encoder.state_dict())
    model = md.load(tmp_path)
    assert model.meta.model.block == "pre_norm" and model.encoder.out_norm is not None
    assert _onnx_error(model, onnx_session(export_onnx(model))) <= 1e-5


def test_faiss_exact_equals_brute_force_and_ivf_recall_is_measured(served):
    _, model, _, _ = served
    items = model.items[1:].numpy()
    queries = np.random.default_rng(0).standard_normal((50, DIM)).astype(np.float32)
    scores, rows = search(build_index(items, "exact"), queries, 10)
    brute = torch.from_numpy(queries) @ torch.from_numpy(items).T  # (Q, N)
    want_s, want_i = brute.topk(10, dim=1)
    assert np.array_equal(rows, want_i.numpy() + 1)
    np.testing.assert_allclose(scores, want_s.numpy(), rtol=1e-5, atol=1e-5)
    ivf = build_index(items, "ivf", nlist=8, nprobe=1)
    partial = recall_at_k(search(ivf, queries, 10)[1], rows, 10)
    ivf.nprobe = 8  # every cell: exact again
    assert 0.0 < partial < 1.0 and recall_at_k(search(ivf, queries, 10)[1], rows, 10) == 1.0


def test_recommend_excludes_seen_skips_unknown_and_falls_back_to_popularity(served):
    _, model, _, _ = served
    rec = recommend.Recommender(model)
    history = ["sku-14", "ghost", "sku-70", "sku-7"]
    out = rec.recommend(history, k=5)
    assert out.unknown == ["ghost"] and not out.popular
    user = model.user_vectors(torch.tensor([[2, 10, 1]]))
    scores = (user @ model.items.T)[0]
    scores[[0, 1, 2, 10]] = float("-inf")
    assert out.raw_ids == model.raw_of(scores.topk(5).indices.tolist())
    assert rec.recommend(history, k=300, exclude_seen=False).raw_ids.count("sku-7") == 1
    empty = rec.recommend(["ghost"], k=3)
    assert empty.popular and empty.raw_ids == ["sku-7", "sku-14", "sku-21"] and empty.unknown == ["ghost"]


def test_recommend_main_reports_a_bad_model_dir_in_one_line(tmp_path, capsys):
    assert recommend.main([str(tmp_path / "nope"), "--history", "a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope" in err[0]


@pytest.mark.cli
def test_recommend_command_line_on_raw_ids(served):
    out, model, _, _ = served
    run = subprocess.run([sys.executable, "-m", "trainer.recommend", str(out), "--history", "sku-14 ghost sku-7",
                          "--k", "4"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = [line.split("\t") for line in run.stdout.splitlines()]
    want = recommend.Recommender(model).recommend(["sku-14", "sku-7"], k=4)
    assert [raw for raw, _ in lines] == want.raw_ids
    np.testing.assert_allclose([float(s) for _, s in lines], want.scores, rtol=1e-5)
    assert "ghost" in run.stderr and "unknown" in run.stderr
    empty = subprocess.run([sys.executable, "-m", "trainer.recommend", str(out), "--history", ""],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert empty.returncode == 0 and "most popular" in empty.stderr
    assert empty.stdout.splitlines()[0].split("\t")[0] == "sku-7"


@pytest.mark.cli
def test_loading_imports_no_ray_torchrec_or_deepspeed(served):
    out = served[0]
    code = (f"import sys; from trainer.serving.model_dir import load; load({str(out)!r}); "
            "heavy = ('ray', 'torchrec', 'deepspeed', 'fbgemm_gpu'); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy); "
            "assert not bad, bad")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
