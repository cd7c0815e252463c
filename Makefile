# Two targets a newcomer needs: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint bench clean fashion-mnist mutation

$(BIN)/ctok: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Debian's Fashion-MNIST package where the machine allows it (root with apt-get), and nothing
# otherwise: the demo then says where else it looks ($$CTOK_FASHION_MNIST, --data, a torchvision
# download when online), and the tests that need the real data skip with that message.
FASHION_MNIST := /usr/share/datasets/fashion-mnist

fashion-mnist:
	@if [ ! -d $(FASHION_MNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) || true; \
	fi

demo: $(BIN)/ctok fashion-mnist
	$(BIN)/ctok demo --out demo-out

test: $(BIN)/ctok fashion-mnist
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(BIN)/ctok fashion-mnist
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m 'not slow'

lint: $(BIN)/ctok
	$(BIN)/ruff check src tests benchmarks scripts

bench: $(BIN)/ctok
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache

# Mutation testing of the core modules against their fast tests; scope and settings are
# [tool.mutmut] in pyproject.toml, the last scores docs/testing.md. About an hour on 2 busy cores.
# Torch single-threaded in MUTATION_JOBS forked workers (OpenMP after fork can hang). Each run
# starts from an empty mutants/: mutmut would keep an old survivor's verdict after tests change.
# MUTATION_TEST_BUDGET_S: a mutant runs the fastest of its tests that fit in this many recorded
# seconds (scripts/mutation_order.py); 0 runs all of them (hub.py's mutants then take a minute each).
MUTMUT := mutmut==3.8.1
MUTATION_JOBS ?= 2
MUTATION_TEST_BUDGET_S ?= 5

mutation: $(BIN)/ctok
	$(BIN)/pip install --quiet $(MUTMUT)
	rm -rf mutants
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$(CURDIR)/scripts \
		MUTATION_TEST_BUDGET_S=$(MUTATION_TEST_BUDGET_S) $(BIN)/mutmut run --max-children $(MUTATION_JOBS)
	$(BIN)/python scripts/mutation_report.py
