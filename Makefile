# Two entry points: `make demo` (train -> generate -> sparsity on the default recipe) and `make test`.
# Both create .venv on first use: CPU torch first (pinned; an unpinned torch pulls a multi-GB CUDA build),
# then everything else under constraints.txt so pip never swaps torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := runs/shakespeare-tiny
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_DATASETS_OFFLINE ?= 1

.PHONY: demo test install lint
demo: install
	$(BIN)/spikelm train recipes/shakespeare-tiny.yaml --out $(RUN)
	$(BIN)/spikelm generate $(RUN)/export "ROMEO:" --max-new-tokens 80 --seed 0
	$(BIN)/spikelm sparsity $(RUN)/export --recipe recipes/shakespeare-tiny.yaml --json $(RUN)/sparsity.json --plot $(RUN)/sparsity.png

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@
