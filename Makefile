# Two commands on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment (.venv) when it is missing: requirements.txt and
# requirements-parity.txt, every version pinned by constraints.txt (the tested set).
# Python 3.11 or 3.12 is needed (ve-fairseq ships cp311/cp312 wheels only): set PYTHON if
# `python3` is another version, e.g. `make test PYTHON=python3.11`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_INSTALL = $(1)/python -m pip install --disable-pip-version-check -q
REFRESH_VENV := $(VENV)-constraints

.PHONY: demo test test-fast lint bench env clean python-check constraints

env: $(STAMP)

# $(call check_python,INTERPRETER): fail with a clear message unless it is Python 3.11 or 3.12.
GOAL = $(or $(MAKECMDGOALS),env)
define check_python
py="$(1)"; v=$$("$$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || v=""; \
case "$$v" in \
3.11|3.12) ;; \
"") echo "error: '$$py' is not a working Python interpreter; mam-clap needs Python 3.11 or 3.12." >&2; \
    echo "Set PYTHON to one, e.g.: make $(GOAL) PYTHON=python3.11" >&2; exit 1;; \
*) echo "error: '$$py' is Python $$v; mam-clap needs Python 3.11 or 3.12 (ve-fairseq has cp311/cp312 wheels only)." >&2; \
   if [ "$$py" = "$(BIN)/python" ]; then echo "$(VENV) was made with it: remove $(VENV), then set PYTHON, e.g.: make $(GOAL) PYTHON=python3.11" >&2; \
   else echo "Set PYTHON to a 3.11 or 3.12 interpreter, e.g.: make $(GOAL) PYTHON=python3.11" >&2; fi; \
   exit 1;; \
esac
endef

# The interpreter that will run everything: the venv's if it exists, else $(PYTHON).
python-check:
	@$(call check_python,$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)))

$(STAMP): requirements.txt requirements-parity.txt constraints.txt setup.py | python-check
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(call PIP_INSTALL,$(BIN)) -c constraints.txt -r requirements.txt
	$(call PIP_INSTALL,$(BIN)) -c constraints.txt --no-deps -r requirements-parity.txt
	$(call PIP_INSTALL,$(BIN)) --no-deps -e .
	touch $@

demo: $(STAMP)
	$(BIN)/python examples/demo/run_demo.py --out-dir outputs/demo
	$(BIN)/python examples/demo/check_readme.py outputs/demo/report.json README.md

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The edit-test loop: every test not marked `slow` (no training runs, no subprocesses).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# ruff (rules in ruff.toml); .ci/run runs it before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench_pretrain --out outputs/bench/pretrain.json
	$(BIN)/python -m benchmarks.training_loop --out outputs/bench/training_loop.json
	$(BIN)/python -m benchmarks.bench_upstream --out outputs/bench/upstream.json
	$(BIN)/python -m benchmarks.bench_optimizer --out outputs/bench/optimizer.json
	$(BIN)/python -m benchmarks.bench_finetune --out outputs/bench/finetune.json
	$(BIN)/python -m benchmarks.bench_teacher --out outputs/bench/teacher.json

# Re-resolve requirements*.txt without the old pins in a scratch venv and rewrite
# constraints.txt from it; then run `make test` (it reinstalls .venv from the new file).
constraints:
	@$(call check_python,$(PYTHON))
	rm -rf $(REFRESH_VENV)
	$(PYTHON) -m venv $(REFRESH_VENV)
	$(call PIP_INSTALL,$(REFRESH_VENV)/bin) -r requirements.txt
	$(call PIP_INSTALL,$(REFRESH_VENV)/bin) --no-deps -r requirements-parity.txt
	{ sed -n '/^#/p' constraints.txt; $(REFRESH_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(REFRESH_VENV)

clean:
	rm -rf outputs
