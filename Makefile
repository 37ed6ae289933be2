# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: setup demo test test-fast test-fullsize lint jobs bench

setup:
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q -e custom

demo: setup
	$(PYTHON) -m fedfms.cli demo --out demo_out

# the linter first (seconds), then every test
test: setup
	$(PYTHON) -m ruff check custom tests bench poc provisioning
	$(PYTHON) -m pytest -q

# ML core, data and unit tests only (no FLARE processes): a few minutes
test-fast: setup
	$(PYTHON) -m pytest -q -m "not integration and not fullsize"

# the full-size rehearsal: shipped ViT-B/ViT-L jobs at 1024 px, random init, simulator and POC (~25 min, 2 cores)
test-fullsize: setup
	$(PYTHON) -m pytest -q -s -m fullsize tests/fullsize

# syntax errors, pyflakes, long lines and invalid escapes (rules in ruff.toml)
lint: setup
	$(PYTHON) -m ruff check custom tests bench poc provisioning

jobs:
	$(PYTHON) -m fedfms.cli job generate --jobs-dir jobs

bench: setup
	$(PYTHON) bench/bench_models.py
