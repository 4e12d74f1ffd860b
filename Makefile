# One-command set-up on a fresh machine: a virtual environment with the verified stack
# (requirements.txt, see ../shared/ENV.md), crisp-edge installed editable, and the Debian data.
#   make demo        set up, then run the main job on the embedded ViT
#   make test        set up, then run the default test suite (the one CI runs)
#   make test-slow   the slow tests too
#   make parity      the whole parity suite (ONNX Runtime + ExecuTorch, fault injection)
#   make bench       the benchmarks (about 40 minutes on 2 cores); JSON lands in bench/results/ and the
#                    README's results tables are re-rendered from it

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-slow parity bench clean

setup: $(STAMP) $(FMNIST)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $@

# Debian packages: the Fashion-MNIST data, and g++ for the ExecuTorch C++ runner (export/runner)
$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist g++

demo: setup
	$(VENV)/bin/crisp-edge demo

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q

# The whole parity suite (architecture x mode x runtime x task, fault injection, the C++ runner's outputs)
parity: setup
	$(PY) -m pytest -q runtime_tests/test_parity.py runtime_tests/test_parity_faults.py runtime_tests/test_matrix.py

bench: setup
	-$(PY) bench/bench_retrofit.py  # a leading '-': a missed target (exit 1) still lets the rest run
	-$(PY) bench/bench_adapt.py
	-$(PY) bench/bench_onnx.py
	-$(PY) bench/reliability.py
	$(PY) bench/render_readme.py

clean:
	rm -rf $(VENV) crisp-edge-demo .pytest_cache
