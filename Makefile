# Two commands on a fresh machine:  `make run` (install + default pipeline)  and  `make test`.
# Both create or reuse the project-local virtualenv .venv, installed with constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# the suite on 2 processes: each xdist_group on one of them as a unit (the end-to-end modules
# in two lanes of about equal length, LANES in tests/conftest.py), the unit tests in the gaps
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder

.PHONY: install run test test-fast lint bench clean bytecode fashion-mnist fashion-mnist-data

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/clpipe run $(ARGS)

# every Ray worker process imports the project; with PYTHONDONTWRITEBYTECODE set (as on some
# machines) nothing caches its compiled modules unless they are compiled beforehand
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q cl_core pipelines infra tests > /dev/null

test: $(STAMP) bytecode
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP) bytecode
	$(BIN)/python -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cl_core pipelines infra tests bench
	$(BIN)/ruff format --check cl_core pipelines infra tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/loader.py

clean:
	rm -rf clpipe-work .pytest_cache

# Fashion-MNIST from Debian's package (installed when root with apt, else the one command to run),
# then the 2-core config: `make fashion-mnist`
FASHION := /usr/share/datasets/fashion-mnist
fashion-mnist-data:
	@if [ -f $(FASHION)/t10k-labels-idx1-ubyte.gz ] || [ -f $(FASHION)/t10k-labels-idx1-ubyte ]; then \
	  echo "Fashion-MNIST is in $(FASHION)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is not installed; run: sudo apt-get install -y dataset-fashion-mnist"; exit 2; \
	fi

fashion-mnist: $(STAMP) fashion-mnist-data
	$(BIN)/clpipe run fashion_mnist $(ARGS)
