"""Deployment tests: real FLARE processes on loopback. Slow (minutes) but part of the default run. The code under
test is the installed package (fedfms.deploy) and the scripts in poc/ and provisioning/ that call it."""

from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "integration: starts a real FLARE server and sites on loopback (minutes); in the default run")
