# `make demo` trains plugins.yaml on the built-in spoken_digits data; `make test` runs the tests.
# Both create .venv (pinned by requirements.txt) when it is missing or out of date.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean-venv

EXAMPLES := examples/plait-ema examples/plait-tensorboard

# The example plugins are installed from their folders, as a user installs a plugin package.
$(STAMP): pyproject.toml requirements.txt $(addsuffix /pyproject.toml,$(EXAMPLES))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.txt -e '.[test,bench,quantize,domains]' $(addprefix -e ,$(EXAMPLES))
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/plait train plugins.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
