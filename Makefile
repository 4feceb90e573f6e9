# circuit atlas: set-up, demo and tests. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV   ?= .venv
# GPU users who want the venv to see their own torch: make setup VENV_ARGS=--system-site-packages
VENV_ARGS ?=
BIN    := $(VENV)/bin
TORCH_CPU_VERSION := 2.13.0

.PHONY: setup demo test test-slow clean-demo toy

$(BIN)/python:
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null

# On a machine without an NVIDIA GPU, install the CPU build of torch before anything else so no
# CUDA packages are downloaded. Where torch is already importable (a GPU user's own build), keep it.
setup: $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch from the default index (with CUDA)"; \
		$(BIN)/pip install torch; \
	else \
		$(BIN)/pip install torch==$(TORCH_CPU_VERSION); \
	fi
	$(BIN)/pip install -e ".[test]"

demo: setup
	$(BIN)/atlas demo

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

clean-demo:
	rm -rf data/atlases/demo

# Retrain the shipped toy world from scratch (data/toy/; about an hour on 2 CPU cores): the pipeline
# (VAE, then transformer + text encoders), then transcoders for every double-stream layer and both
# streams, then the SAE baseline for two layers (image stream, where transcoders fit least). Seeded; see data/toy/README.md.
TOY_TC_ARGS := --model toy --prompts data/toy/prompts/train.txt --eval-prompts data/toy/prompts/held_out.txt \
	--out data/toy --steps 2000 --batch-size 1024 --lr 3e-3 --reuse 4 --buffer-gb 0.4 --gen-batch-size 64 --seed 0
toy: setup
	$(BIN)/python -m atlas.toy.train --out data/toy/pipeline --seed 0
	rm -rf data/toy/temporal-aware-transcoders data/toy/temporal-aware-saes
	$(BIN)/atlas train-transcoders $(TOY_TC_ARGS)
	$(BIN)/atlas train-transcoders $(TOY_TC_ARGS) --role sae --layers 1,2 --streams img
