# From a fresh clone: `make test` runs the tests, `make bench` runs the benchmarks. Both create
# .venv (reusing an installed torch through --system-site-packages), install torch and the dev
# tools, and build the extension incrementally (ninja) before running.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch>=2.4
DEV_DEPS := numpy pytest pytest-benchmark hypothesis expecttest ninja ruff matplotlib tqdm \
            setuptools wheel
STAMP := $(VENV)/.kxops-deps

.PHONY: deps build test fuzz bench demo lint info clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PIP) install --upgrade-strategy only-if-needed "$(TORCH_SPEC)" $(DEV_DEPS)
	touch $@

deps: $(STAMP)

# build_ext --inplace keeps ninja's object files in build/, so a rebuild recompiles only what
# changed (pip's editable builds start from a fresh temp dir every time).
build: deps
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m kxops
	$(PY) -m pytest tests

# The long fuzz profile (thousands of cases per property), for before a release.
fuzz: build
	KXOPS_FUZZ=long $(PY) -m pytest tests -m fuzz

bench: build
	$(PY) benchmarks/run.py

# The example trained with the kernels, then the same steps on the reference ops for the time
# per step (the first run fails if the event micro-F1 stays below its stated level).
demo: build
	$(PY) examples/train_multilabel_dgcnn.py --steps 400
	KXOPS_DISABLE_EXT=1 $(PY) examples/train_multilabel_dgcnn.py --steps 400

lint: deps
	$(PY) -m ruff check .

info: build
	$(PY) -m kxops

clean:
	rm -rf build kxops/*.so *.egg-info
