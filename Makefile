# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv from requirement.txt when it is missing (or older than requirement.txt).
# `make test-vllm` also builds the vLLM venv of stage 2 (`make vllm-venv`, tools/vllm_venv.sh).
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
VLLM_VENV ?= .venv-vllm
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test bench bench-vllm clean-demo vllm-venv test-vllm

$(VENV)/.installed: requirement.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -r requirement.txt
	touch $@

test: $(VENV)/.installed
	$(PYTHON) -m pytest

$(VLLM_VENV)/.installed: requirement-vllm.txt tools/vllm_venv.sh tools/vllm_pixtral_pil.py
	bash tools/vllm_venv.sh $(VLLM_VENV)

vllm-venv: $(VLLM_VENV)/.installed

# get_text.py --backend vllm on the CPU, run under the vLLM venv by tests/test_text_vllm.py.
test-vllm: $(VENV)/.installed $(VLLM_VENV)/.installed
	VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PYTHON) -m pytest tests/test_text_vllm.py

demo: $(VENV)/.installed
	bash tools/demo.sh $(PYTHON)

clean-demo:
	rm -rf demo_out

bench: $(VENV)/.installed
	$(PYTHON) tools/bench.py $(BENCH_ARGS)

# stage 2's backends on the tiny LLaVA: transformers batched vs vLLM (tools/bench.py --vllm)
bench-vllm: $(VENV)/.installed $(VLLM_VENV)/.installed
	$(PYTHON) tools/bench.py --vllm --vllm-python $(abspath $(VLLM_VENV))/bin/python $(BENCH_ARGS)
