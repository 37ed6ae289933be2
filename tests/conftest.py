"""Shared fixtures. Kept small: other test folders rely on it too.

How the suite runs in parallel (``make test``: pytest-xdist, ``-n 3 --dist loadgroup``; tests/README.md):
- each worker is its own process; federations pick free ports, so several run at once;
- tests that share a module-scoped federation carry one ``xdist_group`` mark, so one worker runs them all and
  the federation starts once (any test without the mark may run in any worker);
- under xdist the heaviest tests are handed out first (POC/provisioned federations, then simulator runs, then
  full-size models, then the rest), so the short unit tests fill the gaps at the end instead of a long federation
  starting last."""

from __future__ import annotations

import os

import pytest
import torch

from fedfms.data.synthetic import make_disc_site

# Torch threads per test process: the machine's 2 cores are shared by the xdist workers (and the federations
# they start), so a worker computes on one; a serial run uses two.
TORCH_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _torch_threads():
    # More threads than cores makes the small matrix products of the tiny model slower, not faster.
    previous = torch.get_num_threads()
    torch.set_num_threads(min(TORCH_THREADS, previous))
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def disc_site(tmp_path):
    """A learnable one-class site: 5 volumes x 8 slices of bright discs, images 128, masks 32 (tiny's sizes)."""
    return make_disc_site(tmp_path / "site", num_volumes=5, slices_per_volume=8, seed=0)


def _weight(item: pytest.Item) -> int:
    """Lower runs earlier under xdist: the longest kinds of test first."""
    if item.get_closest_marker("integration"):
        return 0 if "flare_deploy" in item.nodeid else 1
    if item.get_closest_marker("slow"):
        return 2
    return 3


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike (xdist checks the collections match)
        items.sort(key=_weight)  # stable: a module's tests keep their order, a shared federation's tests stay together
