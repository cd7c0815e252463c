# Two targets a newcomer needs: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast bench clean

$(BIN)/ctok: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Debian's Fashion-MNIST package where the machine allows it (root with apt-get); elsewhere the demo
# says where else it looks ($$CTOK_FASHION_MNIST, --data, a torchvision download when online).
FASHION_MNIST := /usr/share/datasets/fashion-mnist

demo: $(BIN)/ctok
	@if [ ! -d $(FASHION_MNIST) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) || true; \
	fi
	$(BIN)/ctok demo --out demo-out

test: $(BIN)/ctok
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(BIN)/ctok
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m 'not slow'

bench: $(BIN)/ctok
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache
