# The README's two commands: `make demo` and `make test`. Both run `setup` when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A user with a GPU may point this at their CUDA build of the same version.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, so the project's requirement is already met and pip never pulls a CUDA build.
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/ctr demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/ctr bench replay

clean:
	rm -rf $(VENV) .ctr runs .pytest_cache
