# The two commands that work on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 resolves to the local CPU wheel on the dev/CI machines; elsewhere pip
# picks the build for the platform.
TORCH ?= torch==2.13.0

.PHONY: demo test test-gpu bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

# CPU suite: Triton kernels run in the interpreter; the CI Hypothesis profile is bounded.
test: $(VENV)/.installed
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -q -m "not gpu" tests

# GPU suite (CUDA machine, e.g. through the device tool): kernels at realistic shapes.
test-gpu:
	python3 -m pytest -q -m gpu tests

bench:
	python3 benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) build *.egg-info
