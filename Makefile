# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both build the local .venv first; torch is pinned to the CPU build that lies on this
# machine's disk, installed before anything that depends on torch can pull a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	# deepspeed ships as an sdist whose setup imports torch: build it against the torch above.
	$(BIN)/pip install -q --no-build-isolation "deepspeed>=0.14"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/rgfusion demo --out runs/demo

# The venv's bin first on PATH: DeepSpeed JIT-builds a CPU op with whichever ninja it finds, and
# the system's and the venv's ninja disagree about the build log, so each rebuilt it (50-130 s).
export PATH := $(CURDIR)/$(BIN):$(PATH)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" tests

test-all: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs
