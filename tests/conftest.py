"""Shared fixtures. Kept small: other test folders rely on it too.

How the suite runs in parallel (``make test``: pytest-xdist, ``-n 4 --dist loadgroup``; tests/README.md):
- each worker is its own process; federations pick free ports, so several run at once;
- tests that share a module-scoped federation carry one ``xdist_group`` mark, so one worker runs them all and
  the federation starts once; the other tests of a module that use a module-scoped fixture are grouped by module
  automatically (``pytest_collection_modifyitems``), so no fixture is made twice; any other test may run in any
  worker;
- under xdist the heaviest tests are handed out first (POC/provisioned federations, then simulator runs, then
  full-size models, then the rest), so the short unit tests fill the gaps at the end instead of a long federation
  starting last;
- memory: simulator federations (integration tests outside flare_deploy) run under a lock shared between the
  workers; one that needs most of the machine's memory (sixteen site processes) takes it alone
  (:func:`federation_memory`), so it never runs beside other federations."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

import pytest
import torch

from fedfms.data.synthetic import make_disc_site

# Torch threads per test process: the machine's 2 cores are shared by the xdist workers (and the federations
# they start), so a worker computes on one (module fixtures included: set here, before any of them runs; two
# threads per worker let OpenMP spin-wait away a core under contention); a serial run uses two.
TORCH_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


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


_held = {"count": 0}


@contextlib.contextmanager
def federation_memory(alone: bool = False):
    """Hold while a simulated federation runs (under xdist; a serial run holds nothing). Federations share it;
    ``alone``: wait until no other worker runs one, and keep new ones waiting until this one ends (the turnstile
    stops new federations from slipping in while it waits). Re-entrant within a worker."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run or _held["count"]:
        _held["count"] += 1
        try:
            yield
        finally:
            _held["count"] -= 1
        return
    base = Path(tempfile.gettempdir()) / f"fedfms-pytest-{run}"
    with open(f"{base}.turnstile", "a") as turnstile, open(f"{base}.memory", "a") as memory:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(memory, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        _held["count"] += 1
        try:
            yield
        finally:
            _held["count"] -= 1
            fcntl.flock(memory, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def federation_lock():
    """:func:`federation_memory`, for module-scoped fixtures that run a federation (they are set up before a test's
    own hold): ``with federation_lock(): run_simulation(...)``."""
    return federation_memory


@pytest.fixture(autouse=True)
def _simulated_federations_share_memory(request):
    if request.node.get_closest_marker("integration") and "flare_deploy" not in request.node.nodeid:
        with federation_memory():
            yield
    else:
        yield


# session fixtures that run a federation: their tests go to one worker together (see pytest_collection_modifyitems)
SHARED_SESSION_FIXTURES = {"demo_fedmsa_run"}


def _weight(item: pytest.Item) -> int:
    """Lower runs earlier under xdist: the longest kinds of test first. A federation that takes the lock alone goes
    before everything: at the start the other workers run POC and provisioned federations, which do not take it, so
    no worker sits waiting for it (started later, it kept three workers waiting ~100 s each)."""
    if item.get_closest_marker("federation_alone"):
        return -1
    if item.get_closest_marker("integration"):
        return 0 if "flare_deploy" in item.nodeid else 1
    if item.get_closest_marker("slow"):
        return 2
    return 3


def _module_fixtures(item: pytest.Item) -> list[str]:
    defs = getattr(item, "_fixtureinfo", None)
    if defs is None:
        return []
    return sorted(name for name, chain in defs.name2fixturedefs.items()
                  if chain and chain[-1].scope in ("module", "class", "package"))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns xdist_group marks into work units
def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    # a module fixture is made once per worker: the tests of a module that use one go to one worker together
    # (unless they carry their own xdist_group, as the shared federations do)
    for item in items:
        shared = sorted(SHARED_SESSION_FIXTURES & set(getattr(item, "fixturenames", ())))
        if shared and not item.get_closest_marker("xdist_group"):  # a session federation: one worker makes it once
            item.add_marker(pytest.mark.xdist_group(f"session:{shared[0]}"))
        if not item.get_closest_marker("xdist_group") and _module_fixtures(item):
            item.add_marker(pytest.mark.xdist_group(f"module:{item.nodeid.split('::')[0]}"))
    # every worker sorts alike (xdist checks that the collections match); stable: a module's tests keep their order
    items.sort(key=_weight)


@pytest.fixture(scope="session")
def demo_fedmsa_run(tmp_path_factory):
    """The offline demo's FedMSA run (pretrained tiny SAM, 3 MNI152 sites, FLARE's simulator), 2 rounds x 1 epoch:
    one federation shared by the bundle and model card tests. Returns the demo folder and the run's workspace."""
    from fedfms.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    with federation_memory():
        assert run_demo(out, rounds=2, epochs=1, methods=("fedmsa",), say=lambda msg: None) == 0
    job_dir = next(out.glob("runs/*/fedmsa/job"))
    return {"out": out, "sites": out / "sites", "job": job_dir, "workspace": job_dir.parent / "workspace",
            "run_dir": job_dir.parent / "workspace" / "server" / "simulate_job"}
