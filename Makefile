# Two set-up commands: `make demo` and `make test`. Each creates .venv if missing and installs
# torch==$(TORCH_VERSION) first, then the project with the dependency versions of constraints.txt.
# Which torch build that is depends on where pip looks: public PyPI serves the multi-GB CUDA build
# on Linux, so on a fresh machine without a GPU pass torch's CPU index:
#   make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for the torch install only (an index URL); empty: pip's own configuration.
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
# DeepSpeed compiles its CPU communication op on first use. Kept per venv: a build killed in the
# shared ~/.cache/torch_extensions leaves a lock file that every later build waits on forever.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install demo test test-fast gpu-smoke clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null

$(STAMP): $(PY) setup.py constraints.txt
	$(PY) -m pip install $(TORCH_INDEX) "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[dev]" -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) launch/demo.py

test: $(STAMP)
	$(PY) -m pytest tests -q -rs --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow"

# Every entry point once on one NVIDIA GPU, checked (docs/gpu-smoke.md); not part of `make test`.
# Needs a CUDA build of torch in $(VENV). GPU_SMOKE_ARGS="--device cpu" rehearses it on CPU.
GPU_SMOKE_ARGS ?=
gpu-smoke: $(STAMP)
	$(PY) benchmarks/gpu_smoke.py $(GPU_SMOKE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
