# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: setup demo test test-fast test-fullsize lint jobs bench

setup:
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q -e custom

demo: setup
	$(PYTHON) -m fedfms.cli demo --out demo_out

# pytest-xdist workers for `make test` (tests/README.md): federations mostly wait on each other's processes,
# so 5 workers keep a 2-core machine's CPUs busier than 4 (186 % against 177 % CPU, 2026-12-07). loadgroup: the tests
# of one shared federation (xdist_group) run in one worker; no reorder: the heaviest tests start first (tests/conftest.py)
TEST_WORKERS ?= 5
PARALLEL = -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# the linter first (seconds), then every test but the full-size rehearsals, in parallel (about 10 min on 2 cores; README.md)
test: setup
	$(PYTHON) -m ruff check custom tests bench poc provisioning
	$(PYTHON) -m pytest -q $(PARALLEL) -m "not fullsize"

# ML core, data and unit tests only (no FLARE processes): a few minutes
test-fast: setup
	$(PYTHON) -m pytest -q $(PARALLEL) -m "not integration and not fullsize"

# the full-size rehearsal: shipped ViT-B/ViT-L jobs at 1024 px, random init, simulator and POC (17-32 min on 2 cores, by machine);
# CI runs it after `make test`
test-fullsize: setup
	$(PYTHON) -m pytest -q -s -m fullsize tests/fullsize

# syntax errors, pyflakes, long lines and invalid escapes (rules in ruff.toml)
lint: setup
	$(PYTHON) -m ruff check custom tests bench poc provisioning

jobs:
	$(PYTHON) -m fedfms.cli job generate --jobs-dir jobs

bench: setup
	$(PYTHON) bench/bench_models.py
