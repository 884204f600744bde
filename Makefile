# The README's two commands: `make demo` and `make test`. Both run `setup` when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A user with a GPU may point this at their CUDA build of the same version.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint bench clean flink-setup gpu-carry

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, so the project's requirement is already met and pip never pulls a CUDA build.
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The PyFlink job's own environment: apache-flink pins numpy/pandas/pyarrow below what Feast
# needs, so it cannot share .venv. The Kafka connector jars go to .venv-flink/jars.
FLINK_VENV := .venv-flink
flink-setup: $(FLINK_VENV)/.installed

$(FLINK_VENV)/.installed: streams/flink/setup_jars.py streams/flink/constraints.txt
	$(PYTHON) -m venv $(FLINK_VENV)
	$(FLINK_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLINK_VENV)/bin/python -m pip install -q -c streams/flink/constraints.txt apache-flink==2.3.0
	$(FLINK_VENV)/bin/python streams/flink/setup_jars.py --venv $(FLINK_VENV)
	touch $@

demo: setup
	$(BIN)/ctr demo

# flink-setup: the PyFlink parity test runs in CI (tests/test_flink_parity.py)
test: setup flink-setup
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/pytest -q tests/test_types.py tests/test_layers.py

bench: setup
	$(BIN)/ctr bench replay

# What the GPU machine (the device tool) needs from here: it has Python 3.12, torch and
# numba-cuda but no package index, so the project's other runtime needs travel as cp312 wheels in
# .whl (ignored; carry it), with the commit, since no .git travels (bench/gpu_device.sh).
GPU_WHEELS := msgspec confluent-kafka noida-db cryptography cffi pycparser
gpu-carry:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $$(for p in $(GPU_WHEELS); do grep -i "^$$p==" constraints.txt; done)
	printf 'CTR_BENCH_COMMIT=%s\nCTR_BENCH_DIRTY=%s\n' "$$(git rev-parse HEAD)" \
		"$$(git status --porcelain --untracked-files=no -- . ':!bench/results' | grep -q . && echo 1 || echo 0)" > .whl/TREE
	@ls .whl && cat .whl/TREE

clean:
	rm -rf $(VENV) $(FLINK_VENV) .ctr runs .pytest_cache
