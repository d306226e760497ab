# Set-up and the two everyday commands. Everything lands in .venv; data and tokenizers in ~/.cache/qrelora.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup train test test-fast clean

setup: $(VENV)/.installed

# torch first, pinned: on a CPU-only machine this is the small CPU wheel, on a CUDA machine the CUDA build.
# A bare "torch" (or a package asking for a newer one) would pull a multi-GB CUDA build onto a CPU box.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

train: setup                     ## the default recipe: ~7M-parameter ReLoRA NF4 on Shakespeare, CPU, ~4 min
	$(VENV)/bin/qrelora train recipes/tiny.toml

test: setup                      ## the whole test suite (GPU tests skip without CUDA)
	$(PY) -m pytest

test-fast: setup                 ## without the slow end-to-end runs
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
