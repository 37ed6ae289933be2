"""A job a POC federation can never start is refused before it is submitted (FLARE's scheduler would otherwise wait
for ``min_clients`` connected sites in silence, as the one-site ViT-L rehearsal did). No FLARE process needed."""

from __future__ import annotations

import json

import pytest

from fedfms.deploy import poc
from fedfms.flare.fed_job import write_job


def test_a_site_less_job_on_a_one_site_federation_is_refused_with_the_mend(tmp_path):
    job = write_job("fedmsa_tiny", tmp_path / "job", num_rounds=1)  # no site list: min_clients 2
    with pytest.raises(RuntimeError) as refused:
        poc.check_schedulable(job, ["site-1"])
    assert str(refused.value) == (
        f"{job / 'meta.json'}: min_clients 2, but this POC federation has 1 site(s) the job deploys to (site-1): "
        "FLARE would never start it; make the job for these sites (fedfms job new VARIANT JOB --sites site-1)")
    poc.check_schedulable(job, ["site-1", "site-2"])


def test_a_job_made_for_its_sites_passes_and_the_deploy_map_counts(tmp_path):
    one = write_job("fedmsa_tiny", tmp_path / "one", num_rounds=1, sites=["site-1"])
    poc.check_schedulable(one, ["site-1"])
    two = write_job("fedmsa_tiny", tmp_path / "two", num_rounds=1, sites=["site-1", "site-2"])
    with pytest.raises(RuntimeError, match=r"has 1 site\(s\) the job deploys to \(site-1\)"):
        poc.check_schedulable(two, ["site-1", "site-3"])  # site-3 gets no app of this job
    meta = json.loads((two / "meta.json").read_text())
    meta["deploy_map"] = {"app": [{"sites": ["site-1", "site-3"]}]}  # FLARE's other form of the map
    (two / "meta.json").write_text(json.dumps(meta))
    poc.check_schedulable(two, ["site-1", "site-3"])


def test_an_unreadable_meta_is_named(tmp_path):
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(RuntimeError, match=r"meta.json: not a readable job meta.json"):
        poc.check_schedulable(tmp_path, ["site-1"])
