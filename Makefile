# Everything runs from a local virtualenv made from nothing but python3 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: build test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@# Triton Inference Server: only the tritonserver binary and Python backend from this wheel (its Python
	@# library wants numpy<2); the backend's stub needs numpy<2 of its own (see lightkv_export/serve.py).
	$(PY) -m pip install --quiet --no-deps nvidia-pytriton==0.7.0
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/triton-stub-site numpy==1.26.4
	touch $(STAMP)

## Run the main job on the tiny preset (offline, CPU): export, LightKV transform, ort-cpu engine, parity.
build: $(STAMP)
	$(PY) build.py --model tiny-qwen-vl --ratio 0.55

## Lint, then the test suite.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(PY) -m ruff check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) engines .pytest_cache
