"""The scaling sweep runner: configs expand into valid trainer configs; a real point trains and is recorded,
a point that runs past its limit is recorded as a time-out, finished points are not rerun, plots are drawn.
One real trainer run (the small config's smallest fft point, 1 worker)."""

import csv
import shutil
import time
from pathlib import Path

import pytest

from cluster import scaling
from trainer.config import load_config

REPO = Path(__file__).resolve().parent.parent
SMALL = "configs/scaling/cpu-small.yaml"
FFT = "seq_len/mixer=fft,seq_len=32"
DWC = "seq_len/mixer=dwc,seq_len=32"
PNG = b"\x89PNG\r\n\x1a\n"


SWEEPS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs" / "scaling").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS)
def test_every_point_is_a_valid_trainer_config(path):
    cfg = scaling.load_sweep_config(REPO / path)
    ids = set()
    for sweep in cfg.sweeps:
        for values in sweep.points():
            resolved = load_config(REPO / cfg.base, scaling.point_overrides(cfg, sweep, values))
            for axis, value in values.items():  # each axis really moves the config
                got = {"mixer": resolved.model.mixer, "seq_len": resolved.model.max_seq_len,
                       "items": resolved.model.num_items, "workers": resolved.distributed.num_workers}[axis]
                assert got == value, (sweep.name, axis)
            ids.add(scaling.point_id(resolved.to_dict()))
    assert len(ids) >= 10
    assert f"--config {path}" in (REPO / path).read_text()  # the header names its launch command


def test_bad_sweep_configs_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: configs/smoke.yaml\nsweeps: {s: {axes: {mixer: [fft]}, overrides: ['model.mixer={mxr}']}}\n")
    cfg = scaling.load_sweep_config(bad)
    with pytest.raises(ValueError, match="mxr"):
        scaling.point_overrides(cfg, cfg.sweeps[0], {"mixer": "fft"})
    bad.write_text("base: configs/smoke.yaml\nsweeps: {s: {axes: {mixer: [fft]}, plot: {x: seq_len}}}\n")
    with pytest.raises(ValueError, match="plot.x"):
        scaling.load_sweep_config(bad)
    assert scaling.main(["--config", str(bad), "--out", str(tmp_path / "o")]) == 2


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    assert scaling.main(["--config", SMALL, "--out", str(out), "--only", FFT]) == 0
    # a limit no run can meet: recorded as a time-out, and the sweep still writes its results
    assert scaling.main(["--config", SMALL, "--out", str(out), "--only", DWC, "--timeout-s", "3"]) == 0
    return out


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "results.csv", newline="") as f:
        return {f"{r['sweep']}/mixer={r['mixer']},seq_len={r['seq_len']}": r for r in csv.DictReader(f)}


@pytest.mark.ray_train
def test_a_point_records_throughput_memory_phases_and_metrics(swept):
    rows = _rows(swept)
    r = rows[FFT]
    assert r["status"] == "ok", r["error"]
    assert float(r["events_per_s"]) > 0 and int(r["workers"]) == 1 and r["items"] == "1000"
    assert 50 < float(r["peak_mem_mb_max"]) < 16_000
    assert float(r["train_s"]) > 0 and float(r["eval_s"]) > 0 and float(r["fit_s"]) >= float(r["train_s"])
    assert 0 < float(r["value"]) <= 1 and 0 < float(r["oracle"]) <= 1
    assert float(r["oracle_fraction"]) == pytest.approx(float(r["value"]) / float(r["oracle"]), rel=1e-3)
    pid = r["point"]
    assert (swept / "points" / pid / "point.json").is_file() and not (swept / "points" / pid / "run").exists()


@pytest.mark.ray_train
def test_a_time_out_is_recorded_and_the_sweep_goes_on(swept):
    rows = _rows(swept)
    assert rows[DWC]["status"] == "timeout" and rows[DWC]["events_per_s"] == ""
    assert rows[FFT]["status"] == "ok"  # the earlier point is still in the table


@pytest.mark.ray_train
def test_finished_points_are_not_rerun(swept, capsys):
    t0 = time.perf_counter()
    assert scaling.main(["--config", SMALL, "--out", str(swept), "--only", FFT, DWC]) == 0
    assert time.perf_counter() - t0 < 30  # no trainer ran
    out = capsys.readouterr().out
    assert out.count("done before") == 2 and "running" not in out
    assert len(_rows(swept)) == 2


@pytest.mark.ray_train
def test_plots_are_drawn(swept, tmp_path):
    png = swept / "seq_len.png"
    assert png.read_bytes()[:8] == PNG
    # and redrawn from a results.csv alone
    shutil.copy(swept / "results.csv", tmp_path / "results.csv")
    assert scaling.main(["--config", SMALL, "--out", str(tmp_path), "--plots-only"]) == 0
    assert (tmp_path / "seq_len.png").read_bytes()[:8] == PNG


def test_lift_over_popularity_and_the_margin():
    assert scaling.beats(0.3, 0.2, 0.5) == {"lift_over_popularity": 0.5, "beats_popularity": "yes"}
    assert scaling.beats(0.22, 0.2, 0.5) == {"lift_over_popularity": 0.1, "beats_popularity": "no"}
    assert scaling.beats(0.21, 0.2, 0.23)["beats_popularity"] == "no room"  # the oracle is only 15% above
    assert scaling.beats(0.3, 0.2, None)["beats_popularity"] == "yes"  # no oracle: judged on the margin alone
    assert scaling.beats("", 0.2, 0.5) == {} and scaling.beats(0.3, None, 0.5) == {}


def _fake_rows(sweep: str, exponents: dict[str, float]) -> list[dict]:
    rows = []
    for mixer, a in exponents.items():
        for length in (64, 256, 1024, 4096):
            # seconds per event = 1e-5 * L^a, with a little noise that least squares averages out
            eps = 1 / (1e-5 * length**a * (1.02 if length == 256 else 1.0))
            rows.append({"sweep": sweep, "status": "ok", "mixer": mixer, "seq_len": str(length),
                         "events_per_s": str(eps)})
    rows.append({"sweep": sweep, "status": "oom", "mixer": "attention", "seq_len": "16384", "events_per_s": ""})
    rows.append({"sweep": sweep, "status": "ok", "mixer": "lonely", "seq_len": "64", "events_per_s": "5"})
    return rows


def test_cost_exponents_fit_time_per_event_against_the_axis(tmp_path):
    cfg = scaling.load_sweep_config(REPO / SMALL)
    fits = scaling.cost_exponents(cfg, _fake_rows("seq_len", {"fft": 0.1, "attention": 1.0}))
    assert set(fits["seq_len"]) == {"fft", "attention"}  # one point fits nothing; failed points are left out
    assert fits["seq_len"]["attention"]["exponent"] == pytest.approx(1.0, abs=0.02)
    assert fits["seq_len"]["fft"]["exponent"] == pytest.approx(0.1, abs=0.02)
    assert fits["seq_len"]["fft"]["points"] == 4 and fits["seq_len"]["fft"]["seq_len"] == [64, 4096]
    rows = _fake_rows("seq_len", {"fft": 0.1})
    scaling.write_table(cfg, rows, fits, tmp_path / "README.md")
    text = (tmp_path / "README.md").read_text()
    assert "| mixer | seq_len | status | events_per_s |" in text and "| oom |" in text.replace("attention | 16384 ", "")
    assert f"seq_len^{fits['seq_len']['fft']['exponent']} for fft (4 points, seq_len 64-4096)" in text
    assert "| fft | 64 | ok | 65,975 |" in text  # 1 / (1e-5 * 64**0.1): numbers rounded for the table
    assert [scaling._cell(v) for v in ("0.24333333333333335", 7827.6, "", "no room", 0.058)] == [
        "0.2433", "7,828", "", "no room", "0.058"]


def test_derived_values_feed_the_overrides_and_bad_ones_are_refused(tmp_path):
    cfg = scaling.load_sweep_config(REPO / "configs/scaling/cpu.yaml")
    sweep = next(s for s in cfg.sweeps if s.name == "seq_len")
    for length, batch in ((64, 128), (1024, 8), (8192, 1)):
        overrides = scaling.point_overrides(cfg, sweep, {"mixer": "fft", "seq_len": length})
        resolved = load_config(REPO / cfg.base, overrides)
        assert resolved.training.batch_size == batch and resolved.model.max_seq_len == length
    bad = tmp_path / "bad.yaml"
    for expr, why in (("__import__('os')", "only arithmetic"), ("seq_len.bit_length()", "only arithmetic"),
                      ("lenght * 2", "not an axis"), ("8192 // (seq_len - 32)", "by zero")):
        bad.write_text("base: configs/smoke.yaml\nsweeps: {s: {axes: {seq_len: [32, 64]}, "
                       f"derive: {{b: \"{expr}\"}}, overrides: ['training.batch_size={{b}}']}}}}\n")
        with pytest.raises(ValueError, match=why):
            scaling.load_sweep_config(bad)
