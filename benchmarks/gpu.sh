#!/usr/bin/env bash
# The GPU run of issue #14 (benchmarks/gpu.py), for a lent device machine: plain torch only (its image has torch
# with CUDA, no TorchRec, Ray, DeepSpeed or pyarrow; the working tree is copied there, no .git, no .venv).
#
# Through the device tool, from the repository root (one call; about 8 minutes of the 15 a task gets):
#     run  command: COMMIT=<git rev-parse --short HEAD, typed in here> bash benchmarks/gpu.sh
#          timeout_s: 600
# It writes $OUT/gpu.json (JSON after every section, so a cut-short run still returns one). Copy the returned
# file to benchmarks/results/gpu.json and commit it; check status.failed / status.incomplete in it first.
# Locally (no device tool) it writes benchmarks/results/gpu.json directly.
#
# Environment: OUT (output directory), COMMIT (recorded in provenance), BUDGET_S (whole run, default 420 s),
# PYTHON (interpreter, default python3 or python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-$(command -v python3 || command -v python)}"
OUT_DIR="${OUT:-benchmarks/results}"
export COMMIT="${COMMIT:-}"

echo "== machine"
nvidia-smi || echo "nvidia-smi not available"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda",
torch.version.cuda, "available", torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else "")'

echo "== benchmarks.gpu -> $OUT_DIR/gpu.json"
"$PY" -m benchmarks.gpu --device cuda --out "$OUT_DIR" --budget-s "${BUDGET_S:-420}"
