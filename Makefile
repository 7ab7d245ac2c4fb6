# `make demo` trains plugins.yaml on the built-in spoken_digits data; `make test` runs the tests;
# `make lint` runs ruff and mypy (their rules are in pyproject.toml).
# Each creates .venv (pinned by requirements.txt) when it is missing or out of date.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean-venv

EXAMPLES := examples/plait-ema examples/plait-tensorboard

# The example plugins are installed from their folders, as a user installs a plugin package.
$(STAMP): pyproject.toml requirements.txt $(addsuffix /pyproject.toml,$(EXAMPLES))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.txt -e '.[test,bench,quantize,domains,lint,trackers]' $(addprefix -e ,$(EXAMPLES))
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/plait train plugins.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

# mypy reads the packages by their installed names (plait.core is core/, ...): a tree of links
# gives it that layout, which setuptools' editable install hides behind an import hook.
TYPECHECK := build/typecheck
PACKAGES := core modalities plugins launch testing
EXAMPLE_PACKAGES := plait-ema/plait_ema plait-tensorboard/plait_tensorboard

lint: $(STAMP)
	$(BIN)/ruff check .
	@mkdir -p $(TYPECHECK)/plait
	@for p in $(PACKAGES); do ln -sfn ../../../$$p $(TYPECHECK)/plait/$$p; done
	@for p in $(EXAMPLE_PACKAGES); do ln -sfn ../../examples/$$p $(TYPECHECK)/$$(basename $$p); done
	cd $(TYPECHECK) && ../../$(BIN)/mypy --config-file ../../pyproject.toml $(addprefix -p plait.,$(PACKAGES)) \
		$(foreach p,$(EXAMPLE_PACKAGES),-p $(notdir $(p)))

clean-venv:
	rm -rf $(VENV)
