# Two commands a newcomer types: `make test` and `make demo`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUILD_STAMP := $(VENV)/.built

.PHONY: venv build test test-slow test-all demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first and alone, pinned: the CPU wheel these machines carry; never a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# build tools, then the package's own dependencies (pyproject extras) at the tested versions
	$(PY) -m pip install -q -c constraints.txt ninja
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

$(BUILD_STAMP): $(STAMP) setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*.h)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(BUILD_STAMP)

build: $(BUILD_STAMP)

# The fast suite (about 5 minutes on 2 cores). Real-model tests are marked slow: `make test-slow`
# (CI runs both).
test: build
	$(PY) -m pytest -q -m "not slow" tests

test-slow: build
	$(PY) -m pytest -q -m slow tests

test-all: test test-slow

demo: build
	$(PY) -m lape_kernels.cli demo

bench: build
	$(PY) benchmarks/bench_collect.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf build *.egg-info lape_kernels/*.so $(VENV)
