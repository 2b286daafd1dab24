# The README's two commands are `make demo` and `make test`; both set up .venv first.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# CPU build of torch, installed first so the project's own `torch>=2.4` is already met.
# A torch already in $(VENV) (e.g. a CUDA build you installed) is kept as it is.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.dreamddp-installed

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m dreamddp.demo

test: setup
	$(PY) -m pytest

test-all: setup
	$(PY) -m pytest -m ''

bench: setup
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
