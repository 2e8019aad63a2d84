# Two commands for a fresh machine; each installs what it needs into .venv first.
#   make demo   - the main job: end-to-end search on the real leafsnap20 photos (local Ray cluster)
#   make test   - the type checker (mypy on mgfa_ray/, [tool.mypy] in pyproject.toml), the docs (mkdocs --strict),
#                 then the test suite
#                 (what CI runs; installs Debian's chromium when absent, for the dashboard test)
# For a GPU machine without a package registry (README, "GPU check"):
#   make gpu-wheels - here: the wheels, photos and detector it needs, into the git-ignored .gpu/
#   make gpu-check  - there: everything GPU-related in one command, results into $OUT
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast smoke gpu-wheels gpu-check

# uv (a pinned wheel from PyPI) installs the packages: 45 s on the 2-core machine with an empty
# cache against 230 s for pip (torch's CUDA libraries are most of the 3 GB); from its cache
# (~/.cache/uv) a second install links the files. --compile-bytecode as pip does: these machines set
# PYTHONDONTWRITEBYTECODE=1, so without it every process compiles what it imports, each time (torch
# + Ray + Ultralytics: 15 s instead of 6 s; the test suite 31 min instead of 17). 41 s from the cache.
# The venv keeps pip for `pip install -e '.[dashboard]'`.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==0.13.8
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/mgfa-ray run jobs/leafsnap20.yaml

smoke: $(VENV)/.installed
	$(BIN)/mgfa-ray run jobs/leafsnap20.yaml --smoke

# tests/test_dashboard.py drives headless Chromium (Debian's package); installed here when absent,
# and skipped with its reason where that is not possible (no root, no package mirror).
# The tests run in two pytest-xdist workers, each with one Ray cluster its tests share: 12-14 min of
# tests on 2 cores (README "Tests"). TEST_WORKERS=0 runs them in this process. In-process Ray clusters
# do not write Ray's machine-wide address file (through it the other worker's drivers joined a fault
# test's cluster and died with it; tests/conftest.py, README "Tests").
TEST_WORKERS ?= 2

test: $(VENV)/.installed
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		|| echo "chromium could not be installed: tests/test_dashboard.py will be skipped"
	$(BIN)/mypy
	$(BIN)/mkdocs build --strict --quiet --site-dir $$(mktemp -d)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal

# A developer's loop: every test but the end-to-end runs marked slow (drivers killed and resumed,
# Ray Data precomputes, Chromium, full disks): about 2 min on 2 cores (README "Tests"). CI runs `test`.
test-fast: $(VENV)/.installed
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

gpu-wheels: $(VENV)/.installed
	$(BIN)/python benchmarks/gpu_wheels.py --out .gpu/wheels
	$(BIN)/python benchmarks/gpu_check.py --pack

# Runs with the machine's own python3 (torch preinstalled there), installing .gpu/wheels itself.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py
