# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv from requirement.txt when it is missing (or older than requirement.txt).
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test bench clean-demo

$(VENV)/.installed: requirement.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -r requirement.txt
	touch $@

test: $(VENV)/.installed
	$(PYTHON) -m pytest

demo: $(VENV)/.installed
	bash tools/demo.sh $(PYTHON)

clean-demo:
	rm -rf demo_out

bench: $(VENV)/.installed
	$(PYTHON) tools/bench.py $(BENCH_ARGS)
