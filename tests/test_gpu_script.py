"""benchmarks/gpu.py, the GPU run of issue #14, on CPU: the same code path as on the device, with tiny lengths
and with TorchRec, Ray, DeepSpeed and pyarrow unimportable (the GPU image has none of them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from benchmarks import gpu

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("torchrec", "fbgemm_gpu", "ray", "deepspeed", "pyarrow")


@pytest.fixture
def plain_torch_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python processes (children included) cannot import the blocked packages."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in BLOCKED))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    probe = subprocess.run([sys.executable, "-c", "import torchrec"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "halted; None in sys.modules" in probe.stderr  # the block holds
    return env


@pytest.mark.slow
def test_quick_cpu_run_writes_every_section(tmp_path: Path, plain_torch_env: dict[str, str]) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=REPO, env=plain_torch_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "gpu.json").read_text())

    assert r["status"] == {"done": True, "failed": [], "incomplete": [],
                           "sections": dict.fromkeys(["parity", "host_syncs", "dense_tower", "mixers"], "ok")}
    assert r["provenance"]["device"]["type"] == "cpu" and r["provenance"]["source_sha256"]

    checks = r["parity"]["checks"]
    assert set(checks) == {"fft", "dwc", "attention", "dense_tower", "fft_vs_dwc_on_device"}
    assert all(c["passed"] for c in checks.values())
    assert "grad_weight" in checks["fft"]["tensors"] and "grad_input" in checks["dense_tower"]["tensors"]

    for name, case in r["host_syncs"]["cases"].items():
        counted = case["patched_reads"]
        assert case["finite"], name
        assert all(isinstance(counted[k], int) for k in ("total", "ours", "others", "steps")), name
        # the step's own sync, the trainer's non-finite flag, once per step; nothing else in this repository
        assert counted["ours"] == counted["steps"], (name, counted["where_ours"])
        assert case["cuda_sync_debug"]["status"].startswith("not run")

    dense = r["dense_tower"]["records"]
    assert {(d["precision"], d["L"]) for d in dense} == {(p, n) for p in ("fp32", "bf16", "bf16_autocast")
                                                          for n in (64, 128)}
    assert all(d["status"] == "ok" and d["tokens_per_s"] > 0 and d["B"] * d["L"] == 512 for d in dense)

    mixers = r["mixers"]["records"]
    assert len(mixers) == 4 * 2 * 2  # variants x dtypes x lengths
    assert all(m["status"] == "ok" and m["ms"] > 0 and m["peak_bytes"] >= 0 for m in mixers)
    assert r["mixers"]["ratios"]["fp32"]["128"]["attention_over_fft_seconds"] > 0


@pytest.mark.slow  # a fresh interpreter: torch's start alone is seconds
def test_mixer_point_in_a_plain_torch_subprocess(plain_torch_env: dict[str, str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The device run's mixer points: the parent side in this process, the child under the block."""
    monkeypatch.setenv("PYTHONPATH", plain_torch_env["PYTHONPATH"])
    args = Namespace(isolation="subprocess", device="cpu", budget=gpu.Budget(60))
    settings = {"mixer_batch": 2, "mixer_repeats": 1}
    rec = gpu.mixer_point("fft", 64, "bf16", args, settings, limit_s=30)
    assert rec["status"] == "ok" and rec["seconds"] > 0 and rec["peak_bytes"] >= 0


def test_a_series_stops_at_its_first_oom_or_time_limit() -> None:
    def measure(series: str, length: int, limit: float) -> dict:
        if series == "big" and length >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"status": "ok", "seconds": 0.1 * length}

    points = [(s, n) for n in (1, 2, 4, 64) for s in ("small", "big")]
    records = gpu.run_series(points, measure, lambda _: 1.0, 10.0, 5.0, gpu.Budget(60))
    status = {(r["series"], r["L"]): r["status"] for r in records}
    assert [status["big", n] for n in (1, 2, 4, 64)] == ["ok", "oom", "oom", "oom"]
    assert [status["small", n] for n in (1, 2, 4, 64)] == ["ok", "ok", "ok", "time_limit"]  # 6.4 s predicted
    assert gpu.run_series(points[:1], measure, lambda _: 1.0, 10.0, 5.0, gpu.Budget(0))[0]["status"] == "budget"


def test_gpu_sh_parses() -> None:
    script = REPO / "benchmarks" / "gpu.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
