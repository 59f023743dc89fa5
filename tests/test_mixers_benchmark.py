"""benchmarks/mixers.py's floor: measured on this machine at tiny sizes, and its arithmetic."""

import pytest

from benchmarks.mixers import fft_floor, machine_rates
from model.mixers import _chunks


@pytest.mark.slow  # a 2048^2 matmul and 64 MiB copies to measure the machine: seconds the fast tier keeps
def test_floor_counts_the_transforms_and_transposes_the_layer_makes():
    dim, batch, lengths = 8, 4, [16, 64]
    rates = machine_rates(dim, batch, lengths)
    assert rates["matmul_flops"] > 0 and rates["copy_bytes_per_s"] > 0
    for length in lengths:
        t = rates["transform"][str(length)]
        assert t["n"] == 2 * length  # K = L, zero padding: the next fast size >= 2L - 1
        b, d = _chunks(batch, dim, t["n"] // 2 + 1)[0]
        assert t["block_sequences"] == (b.stop - b.start) * (d.stop - d.start)
        floor = fft_floor(length, dim, batch, rates)
        seqs = batch * dim
        assert floor["library_seconds"] == 2 * seqs * (t["rfft_seconds_per_sequence"] + t["irfft_seconds_per_sequence"])
        assert floor["library_and_transposes_seconds"] == floor["library_seconds"] + 4 * t["transpose_seconds"]
        assert floor["bytes"] == 4 * batch * length * dim * 4 + 2 * seqs * (length + 1) * 8
        assert floor["roofline_seconds"] >= floor["bytes"] / rates["copy_bytes_per_s"]
