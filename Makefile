# Two commands on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment (.venv) from the pinned requirements.txt when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench env clean

env: $(STAMP)

$(STAMP): requirements.txt requirements-parity.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -r requirements-parity.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $@

demo: $(STAMP)
	$(BIN)/python examples/demo/run_demo.py --out-dir outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_pretrain --out outputs/bench/pretrain.json
	$(BIN)/python -m benchmarks.training_loop --out outputs/bench/training_loop.json
	$(BIN)/python -m benchmarks.bench_upstream --out outputs/bench/upstream.json

clean:
	rm -rf outputs
