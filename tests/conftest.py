"""Shared fixtures. Kept small: other test folders rely on it too."""

from __future__ import annotations

import pytest
import torch

from fedfms.data.synthetic import make_disc_site


@pytest.fixture(autouse=True)
def _torch_threads():
    # More threads than cores makes the small matrix products of the tiny model slower, not faster.
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def disc_site(tmp_path):
    """A learnable one-class site: 5 volumes x 8 slices of bright discs, images 128, masks 32 (tiny's sizes)."""
    return make_disc_site(tmp_path / "site", num_volumes=5, slices_per_volume=8, seed=0)


@pytest.fixture(scope="session")
def demo_fedmsa_run(tmp_path_factory):
    """The offline demo's FedMSA run (pretrained tiny SAM, 3 MNI152 sites, FLARE's simulator), 2 rounds x 1 epoch:
    one federation shared by the bundle and model card tests. Returns the demo folder and the run's workspace."""
    from fedfms.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    assert run_demo(out, rounds=2, epochs=1, methods=("fedmsa",), say=lambda msg: None) == 0
    job_dir = next(out.glob("runs/*/fedmsa/job"))
    return {"out": out, "sites": out / "sites", "job": job_dir, "workspace": job_dir.parent / "workspace",
            "run_dir": job_dir.parent / "workspace" / "server" / "simulate_job"}
