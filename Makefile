# Two commands for a fresh machine; each installs what it needs into .venv first.
#   make demo   - the main job: end-to-end search on the real leafsnap20 photos (local Ray cluster)
#   make test   - the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test smoke

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/mgfa-ray run jobs/leafsnap20.yaml

smoke: $(VENV)/.installed
	$(BIN)/mgfa-ray run jobs/leafsnap20.yaml --smoke

test: $(VENV)/.installed
	$(BIN)/pytest -q
