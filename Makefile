# Set-up is idempotent: .venv is created once and the package is reinstalled only when
# pyproject.toml changes (the stamp file records the last install).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench model check-readme clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/conceptrank demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Retrain the synthetic world's source model and install it as the shipped one
# (src/conceptrank/synthetic/model/); its card records this command, the seed and the code version.
model: $(STAMP)
	$(BIN)/conceptrank synth --out runs/model-world --retrain --ship-model

# The README's results paragraph against a fresh demo run (after `make demo`).
check-readme: $(STAMP)
	$(BIN)/python bench/check_readme.py runs/demo

bench: $(STAMP)
	$(BIN)/python bench/dissect.py

clean:
	rm -rf runs .pytest_cache
