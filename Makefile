# fastlora: the two quick-start commands are `make demo` and `make test`.
# Both create .venv when it is missing and install the package (editable) with
# the test and demo extras. Override the torch requirement with e.g.
#   make test TORCH=torch==2.14.1
# (the default pin is the CPU build that this project's machines carry).

PYTHON3 ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
EXTRAS  ?= test,demo
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.fastlora-installed
WANT    := $(TORCH) [$(EXTRAS)] $(shell cat pyproject.toml | cksum | cut -d' ' -f1)

# pytest runs through its console script, never `python -m pytest`: the latter puts
# the repo root on sys.path, where the top-level kernels/ folder (installed as
# fastlora.kernels) would shadow the unrelated PyPI package `kernels`.
.PHONY: install demo test test-fast bench gpu-check clean

install:
	@test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	@if [ "$$(cat $(STAMP) 2>/dev/null)" != "$(WANT)" ]; then \
	  echo "installing fastlora into $(VENV) ($(TORCH), extras: $(EXTRAS))"; \
	  $(PY) -m pip install -q --upgrade pip && \
	  $(PY) -m pip install -q "$(TORCH)" && \
	  $(PY) -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH)" && \
	  echo "$(WANT)" > $(STAMP); \
	fi

demo: install
	$(VENV)/bin/fastlora demo $(ARGS)

test: install
	$(VENV)/bin/pytest -q $(ARGS)

# The reference path and modules only (skips interpreter and AOT tiers).
test-fast: install
	$(VENV)/bin/pytest -q -m "not interpreter and not aot and not slow" $(ARGS)

bench: install
	$(VENV)/bin/pytest bench -q --benchmark-columns=median,iqr,ops --benchmark-sort=name $(ARGS)

# On a CUDA machine: the GPU test tier and the benchmarks, results under OUT.
gpu-check:
	bash bench/gpu_check.sh $(or $(OUT),bench/results/gpu)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
