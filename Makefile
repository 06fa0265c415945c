# The README's two commands: `make demo` and `make test`. Each creates .venv and installs the
# pinned requirements when missing (Python 3.11; numpy is held at 1.26 by `-c requirements.txt`).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install gpu gpu-wheels clean-venv bench

# The pinned requirements go in with uv (39-70 s on 2 cores, against 80-105 s with pip; compiled
# as pip does, since a machine may set PYTHONDONTWRITEBYTECODE). uv does not read pip's config
# (pip.conf's index, certificates): should it fail, pip installs the same pins instead, saying so.
UV := uv==0.13.9
UV_PIP := $(VENV)/bin/uv pip install -q --python $(VENV)/bin/python

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"scaled-ql needs Python 3.11 (found {sys.version.split()[0]}); set PYTHON=/path/to/python3.11"'
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade "pip<27" "$(UV)"
	$(UV_PIP) --compile-bytecode -r requirements.txt -c requirements.txt \
	  || { echo "make: uv could not install requirements.txt (above); installing it with pip" >&2; \
	       $(VENV)/bin/python -m pip install -q -r requirements.txt -c requirements.txt; }
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/scaled-ql demo

# Two pytest processes (pytest-xdist), a whole test file each at a time, so that a file's Ray
# session and module fixtures are made once, the slowest files first (tests/conftest.py):
# ~620-840 s on 2 cores, against ~890-940 s serially (the suite mostly waits on Ray programs).
# TEST_WORKERS=0 runs it serially (BUILD_NOTES "Tests").
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# The edit loop: a subset (`-m fast`, tests/conftest.py FAST) that runs in 1-3 minutes on 2
# cores and imports every module; `make test` stays the full suite (CI).
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m fast tests

# Optional GPU path: the CUDA 12 build of the same pinned JAX (TensorFlow stays CPU-only).
gpu: $(STAMP)
	$(VENV)/bin/python -m pip install -q -c requirements.txt "jax[cuda12]==0.4.34"

# The wheels benchmarks/gpu_suite.sh needs on the GPU machine (Python 3.12, JAX 0.11, no Haiku or
# rlax): CPython 3.12 x86-64 builds of benchmarks/gpu_wheels.txt, downloaded into build/gpu_wheels
# to be carried there (docs/performance.md, "The GPU suite").
gpu-wheels: $(STAMP)
	rm -rf build/gpu_wheels
	$(VENV)/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --abi cp312 --abi none --platform manylinux_2_28_x86_64 --platform any \
	  -r benchmarks/gpu_wheels.txt -d build/gpu_wheels

clean-venv:
	rm -rf $(VENV)
