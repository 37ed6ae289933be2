"""Deployment tests: real FLARE processes on loopback. Slow (minutes) but part of the default run."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# The code under test are scripts in poc/ and provisioning/, not package modules.
for folder in (HERE, REPO / "poc", REPO / "provisioning"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "integration: starts a real FLARE server and sites on loopback (minutes); in the default run")
