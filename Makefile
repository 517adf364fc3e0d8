# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The virtual environment lives in .venv; torch is installed first from TORCH_SPEC so that a CPU
# machine never downloads the CUDA build (override: make test TORCH_SPEC="torch==2.13.0+cu130 ...").
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test lint format schema bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	# DeepSpeed builds against the installed torch; isolation would fetch a second (CUDA) torch.
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.16"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m phi3v_train.demo

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m phi3v_data.schema --check schemas/
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

schema: install
	$(BIN)/python -m phi3v_data.schema --write schemas/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
