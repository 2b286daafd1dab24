# The README's two commands are `make demo` and `make test`; both set up .venv first.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# CPU build of torch, installed first so the project's own `torch>=2.4` is already met.
# A torch already in $(VENV) (e.g. a CUDA build you installed) is kept as it is.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.dreamddp-installed

.PHONY: setup demo test test-slow test-all lint bench bench-convergence bench-overhead clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# The emulated cluster (dreamddp cluster, the benchmarks) needs iproute2; install it when we can.
	@if ! command -v tc >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq iproute2 >/dev/null || echo "note: could not install iproute2; the cluster tests will skip"; fi
	@# shellcheck lints the launch scripts (tests/test_launch.py); best effort, the test skips without it.
	@if ! command -v shellcheck >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq shellcheck >/dev/null 2>&1 || echo "note: could not install shellcheck; its test will skip"; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev,deepspeed,hf]'
	@# DeepSpeed compiles its CPU ops (shared-memory comm, fused Adam) on first use: about 2 minutes
	@# on 2 cores, once per machine. Done here, by one process, rather than inside a test's ranks.
	DS_ACCELERATOR=cpu $(PY) -c "import torch, sys; torch.cuda.is_available() and sys.exit(0); from deepspeed.accelerator import get_accelerator as a; [a().create_op_builder(n).load() for n in ('ShareMemCommBuilder', 'FusedAdamBuilder')]"
	touch $(STAMP)

demo: setup
	$(PY) -m dreamddp.tools.demo

test: setup
	$(PY) -m pytest

# The slow tier alone (longer multi-process runs); `make test` + `make test-slow` = `make test-all`.
test-slow: setup
	$(PY) -m pytest -m slow

test-all: setup
	$(PY) -m pytest -m ''

# Lint, format check and type check, as CI runs them.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The default grid: 3 links x 6 algorithms on the emulated cluster (root; else simulated links).
bench: setup
	$(PY) benchmarks/run.py --config configs/gpt-tiny.toml --repeats 2 --out benchmarks/results/grid --report

bench-convergence: setup
	$(PY) benchmarks/run.py --convergence --config configs/gpt-tiny.toml --config configs/resnet18-digits.toml \
		--links 100mbit,20ms --steps 120 --eval-every 20 --out benchmarks/results/convergence --report

bench-overhead: setup
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
