# iternn — the two commands on a fresh machine are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU wheel of torch lies on this machine's disk; a bare `torch` requirement would
# pull a multi-GB CUDA build, so setup pins the CPU wheel before installing the package.
TORCH  ?= torch==2.13.0

.PHONY: setup demo tour lint test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,tensorboard]"
	touch $(STAMP)

demo: setup
	$(PY) -m iternn study --quick --out study-report

# ruff's settings are in pyproject.toml ([tool.ruff]); it lints, it does not reformat.
lint: setup
	$(VENV)/bin/ruff check --no-cache src tests benchmarks

test: lint
	PYTHONDONTWRITEBYTECODE=1 $(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) benchmarks/run.py
	$(PY) benchmarks/sparse.py
	$(PY) benchmarks/fixed_points.py

tour: setup
	$(PY) -m iternn demo

clean:
	rm -rf $(VENV) build src/*.egg-info study-report
