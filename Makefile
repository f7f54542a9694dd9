# `make demo` and `make test` work on a fresh machine with Python 3.11 and make.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean docker-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# constraints.txt pins the whole runtime tree, not only the direct requirements.
$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# Trains the demo, then proves it reproduces: two more runs of its first 10 steps
# must match bitwise, every parameter and buffer after every step.
demo: $(VENV)/.installed
	$(BIN)/python train.py --config configs/demo.yaml --output-dir runs/demo --overwrite
	$(BIN)/python -m repro verify --steps 10 -- $(BIN)/python train.py --config configs/demo.yaml

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

# Builds the image and runs the demo in it (docker, or podman/buildah without a
# daemon). Slow and large (the pinned CUDA torch), so not part of `make test`.
docker-check:
	bash scripts/docker_check.sh

clean:
	rm -rf $(VENV) runs
