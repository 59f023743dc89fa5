"""What a GPU run needs to be correct, checked on CPU: the CUDA generator is checkpointed only when CUDA is in use
(with a fake CUDA generator here), device peak memory is 0 off CUDA, and the TF32 policy is explicit."""

import torch

from cluster.scaling import Sweep, plot, row
from tests.helpers import small_stack_config
from trainer.worker import checkpointer
from trainer.worker.checkpointer import cuda_rng_state, restore_cuda_rng
from trainer.worker.stack import peak_device_memory, set_tf32


def test_cuda_rng_is_saved_only_on_cuda():
    assert cuda_rng_state(torch.device("cpu")) == {}
    state = {"torch_rng": torch.get_rng_state()}
    restore_cuda_rng(state, torch.device("cpu"))  # nothing to restore, and no CUDA call on a CPU rank


def test_cuda_rng_round_trip_with_a_fake_device(monkeypatch):
    generators: dict = {}

    def get_rng_state(device):
        return generators.setdefault(str(device), torch.tensor([1, 2, 3], dtype=torch.uint8)).clone()

    def set_rng_state(state, device):
        generators[str(device)] = state.clone()

    monkeypatch.setattr(checkpointer.torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(checkpointer.torch.cuda, "set_rng_state", set_rng_state)
    dev = torch.device("cuda", 1)  # per rank: the rank's own device
    saved = cuda_rng_state(dev)
    assert set(saved) == {"cuda_rng"} and saved["cuda_rng"].tolist() == [1, 2, 3]
    generators[str(dev)] = torch.tensor([9, 9], dtype=torch.uint8)  # training moved the generator on
    restore_cuda_rng({"step": 5, **saved}, dev)
    assert generators[str(dev)].tolist() == [1, 2, 3]
    restore_cuda_rng({"step": 5}, dev)  # a checkpoint written on CPU carries none: left as it is
    assert generators[str(dev)].tolist() == [1, 2, 3]


def test_device_peak_memory_is_zero_off_cuda():
    assert peak_device_memory(torch.device("cpu")) == 0


def test_tf32_off_for_fp32_on_for_bf16():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_tf32(small_stack_config(precision="bf16"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(small_stack_config(precision="fp32"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_sweeps_record_and_plot_device_memory_when_a_point_has_it(tmp_path):
    sweep = Sweep("seq_len", {"seq_len": [50, 200]}, [], 60.0, {"x": "seq_len"})

    def record(seq_len, device_mem):
        res = {"config": {"model": {"mixer": "fft", "max_seq_len": seq_len, "num_items": 10},
                          "distributed": {"num_workers": 2}},
               "throughput": {"events_per_s": 10.0, "sequences_per_s": 1.0, "steps": 3}, "phases_s": {},
               "peak_memory_bytes_per_worker": [2**20, 2**21], "metrics": {"hr@10": 0.1}}
        if device_mem:
            res["peak_device_memory_bytes_per_worker"] = [3 * 2**20, 5 * 2**20]
        return {"status": "ok", "wall_s": 1.0, "overrides": [], "results": res}

    cpu = row(sweep, {"seq_len": 50}, "a", record(50, False), "hr@10")
    gpu = row(sweep, {"seq_len": 200}, "b", record(200, True), "hr@10")
    assert cpu["peak_device_mem_mb_max"] == "" and gpu["peak_device_mem_mb_max"] == 5.0
    cfg = type("Cfg", (), {"sweeps": [sweep], "metric": "hr@10"})()
    assert plot(cfg, [cpu, gpu], tmp_path)  # a fourth panel, and CPU-only rows still plot
