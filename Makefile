# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# setuptools announces every editable install of a package-dir layout ("Editable installation ...
# be careful with folders ... same name"): information, not a problem; only that one is silenced.
PIP    := PYTHONWARNINGS="ignore:Editable installation:UserWarning" $(BIN)/python -m pip

.PHONY: demo test test-fast test-xla test-gpu lint venv clean

# The venv is (re)installed when pyproject.toml changes. torch is pinned to the CPU build
# (torch==2.13.0) in pyproject.toml: a looser pin would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# The main job on the embedded default: local Ray, small model, real English corpus.
demo: $(STAMP)
	$(BIN)/rayq search --preset demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

# What CI runs: unit tests plus the Ray integration and slow tests (xla/gpu lanes skip here).
test: $(STAMP)
	$(BIN)/python -m pytest -m "not xla and not gpu" -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Fast unit tests only (no Ray, no corpus download): the inner loop while developing.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q

# The TPU path on XLA:CPU: its own cached venv (torch 2.9.0 + torch-xla 2.9.0, outside the
# checkout: ~/.cache/rayq/xla-venv; ~5 min and ~8 GB the first time), then the xla-marked tests.
test-xla:
	cluster/xla_lane.sh

# ruff (pyflakes, pycodestyle errors, import order; settings in pyproject.toml) from the lint extra.
LINT_STAMP := $(VENV)/.lint-installed
$(LINT_STAMP): $(STAMP)
	$(PIP) install --quiet -e ".[lint]"
	touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	$(BIN)/ruff check .

# The CUDA path: its own cached venv (CUDA torch, outside the checkout: ~/.cache/rayq/gpu-venv),
# the gpu-marked tests and `rayq bench int8/train --device cuda`, one JSON. Without a GPU it
# prints one line saying it skipped, before downloading anything. Not part of `make test`/CI.
test-gpu:
	@cluster/gpu_lane.sh

clean:
	rm -rf $(VENV) runs build *.egg-info
