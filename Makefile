# The two commands that work on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 resolves to the local CPU wheel on the dev/CI machines; elsewhere pip
# picks the build for the platform.
TORCH ?= torch==2.13.0

.PHONY: demo test test-gpu gpu-install bench bench-models clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

# CPU suite: lint, import layers, then the tests (Triton kernels in the interpreter; the CI
# Hypothesis profile is derandomized and bounded).
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q -m "not gpu" tests

# GPU machine (e.g. the device tool's image: system python3 with torch + triton, no venv).
# The package is installed editable first (no dependencies fetched: nothing can be).
GPU_PY ?= python3
BENCH_OUT ?= benchmarks/results/kernels.md
gpu-install:
	$(GPU_PY) -m pip install -q --no-deps --no-build-isolation -e .

# GPU suite: kernels at realistic shapes, against the reference.
test-gpu: gpu-install
	$(GPU_PY) -m pytest -q -m gpu tests

# Kernel benchmark: prints the table and writes it to $(BENCH_OUT), a generated file (BENCHMARKS.md,
# written by hand, is left alone).
bench: gpu-install
	$(GPU_PY) benchmarks/bench_kernels.py --out $(BENCH_OUT)

# Whole-model benchmark (bitnet against bf16 Inductor in one process): the table to
# benchmarks/results/models.md, each step's kernel and host profile beside it.
bench-models: gpu-install
	$(GPU_PY) benchmarks/bench_models.py --out benchmarks/results/models.md --profile benchmarks/results/models_profile.txt

clean:
	rm -rf $(VENV) build *.egg-info
