# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The virtual environment lives in .venv; torch is installed first from TORCH_SPEC so that a CPU
# machine never downloads the CUDA build (override: make test TORCH_SPEC="torch==2.13.0+cu130 ...").
# Everything else comes from the committed lock (requirements/cpu.lock: exact versions and hashes);
# `make lock` regenerates it, `make test-latest` tries the newest releases the caps allow.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
# Where `make lock` finds torch's CPU wheel (its dependencies are locked, torch itself is TORCH_SPEC).
TORCH_FIND_LINKS ?= https://download.pytorch.org/whl/cpu/torch/
UV_SPEC ?= uv==0.13.9
BOOTSTRAP ?= pip==26.3 setuptools==84.2.1 wheel==0.48.0
LOCK := requirements/cpu.lock
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LATEST_VENV := .venv-latest
PYTEST_ARGS ?=
# The smoke subset of `make test-latest`: parity and generation against the official
# implementation, one tiny training run per strategy, evaluation.
SMOKE_TESTS ?= tests/test_model_parity.py tests/test_processor_parity.py tests/test_model.py \
	tests/test_train_strategies.py tests/test_evaluate.py

.PHONY: install demo test lint format schema bench lock test-latest clean

# DeepSpeed is an sdist built against the installed torch: no build isolation (isolation would
# fetch a second, CUDA, torch). --no-deps: the lock is complete; pip check proves it.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(BOOTSTRAP)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-deps --require-hashes --no-build-isolation -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m tools.demo

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

# Resolve pyproject.toml (extras dev + deepspeed, within its caps) for CPython 3.11 on x86_64 Linux
# with torch's CPU wheel, and write every other package with its hashes.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(UV_SPEC)"
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra deepspeed \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--constraint requirements/torch-cpu.txt --find-links "$(TORCH_FIND_LINKS)" \
		--no-emit-package torch --generate-hashes --upgrade \
		--custom-compile-command "make lock" --output-file $(LOCK)

# A fresh virtualenv with the newest releases the caps allow (no lock), running the smoke subset:
# what a maintainer runs before raising a cap. Not part of CI.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	# torch stays the TORCH_SPEC build just installed (an eager upgrade would fetch a CUDA torch).
	$(LATEST_VENV)/bin/python -c "import torch; print('torch==' + torch.__version__)" \
		> $(LATEST_VENV)/torch-pin.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
		--constraint $(LATEST_VENV)/torch-pin.txt --no-build-isolation -e '.[dev,deepspeed]'
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(transformers|peft|bitsandbytes|deepspeed|accelerate|tokenizers)=='
	$(LATEST_VENV)/bin/python -m pytest -q -x $(SMOKE_TESTS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache .ruff_cache
