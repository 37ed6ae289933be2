"""Deployment tests: real FLARE processes on loopback. Slow (minutes) but part of the default run. The code under
test is the installed package (fedfms.deploy) and the scripts in poc/ and provisioning/ that call it."""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "integration: starts a real FLARE server and sites on loopback (minutes); in the default run")


@pytest.fixture(scope="session", autouse=True)
def _job_processes_fork_from_this_workers_fork_server():
    """Kits set up with ``fork_jobs`` / ``--fork-jobs`` (fedfms.flare.job_launcher) fork their job processes from the
    fork server named in their environment, as a fedfms process's children do: this worker's, which has imported
    torch, MONAI and FLARE once, instead of one per kit parent importing them again (4-5 CPU-s a kit). A kit started
    without it in its environment starts its own (test_poc_fork_jobs.py)."""
    from fedfms.flare import site_forkserver

    site_forkserver.ensure_fork_server()
    yield
