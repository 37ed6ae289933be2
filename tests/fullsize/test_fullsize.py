"""The full-size rehearsal (``make test-fullsize``; excluded from the default ``pytest`` run by pytest.ini's
``-m "not fullsize"``): the shipped ViT-B and ViT-L jobs, with their own defaults except rounds and data size and
random init (no checkpoint), on 1024-px samples, on this CPU, with no timeout set by hand:

- ``fedsam`` and ``fedmsa`` (ViT-B), 2 sites x 4 samples, 2 rounds, through ``fedfms simulate``: exit 0, every site
  in every round, and the per-site memory the run measures within 25 % of the table ``simulate`` plans with
  (``custom/fedfms/assets/site_memory.json``, the README's table);
- ``fedmsa`` (ViT-B), 1 round through a POC federation with mutual TLS, 2 sites;
- ``fedsam_l`` (ViT-L, 1.2 GB per site per round), 1 round through POC with one site (the figures that
  ``bench/bench_fullsize.py`` prints come from this run: peak memory of the server and the site, bytes and
  seconds per transfer).

A site killed mid-round is in the regular suite at tiny scale (tests/flare/test_liveness.py,
tests/flare_deploy/test_poc_liveness.py): killing is not slower at full size, only the rounds are.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedfms.capacity import GB_PER_GIB, site_host_memory
from fedfms.data.site_dataset import patient_split, read_manifest
from fedfms.data.synthetic import make_disc_site

pytestmark = [pytest.mark.fullsize, pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]
RANDOM_INIT = '{"pretrained": false}'  # the paper's -PT ablation: no checkpoint needed


def sites_1024(root: Path, sites: list[str], volumes: int, slices: int) -> Path:
    """Prepared 1024-px sites (SAM's input size, masks 256) of ``volumes`` x ``slices`` samples each."""
    for i, site in enumerate(sites):
        make_disc_site(root / site, site=site, num_volumes=volumes, slices_per_volume=slices, size=128, image_size=1024,
                       mask_size=256, seed=i)
    return root


def fedfms(*args, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedfms.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def train_samples(site_dir: Path) -> int:
    m = read_manifest(site_dir)
    return len(patient_split(m.volumes, 0.1, 0)[0])  # the jobs' val_fraction and split seed


def check_memory(record: dict, variant: str, mode: str, batch: int) -> None:
    table = site_host_memory(variant, mode, "cpu", batch)
    for site, measured in record["peak_rss_gb"].items():
        expected = table.gib * GB_PER_GIB
        print(f"{site}: peak {measured:.2f} GB measured in the run, {expected:.2f} GB in the table ({table.how})")
        assert abs(measured - expected) <= 0.25 * expected, (site, measured, expected)


@pytest.mark.parametrize("variant,mode", [("fedsam", "fedsam"), ("fedmsa", "fedmsa")])
def test_vit_b_jobs_run_to_the_end_in_the_simulator(tmp_path, variant, mode):
    sites = ["site-1", "site-2"]
    # 4 samples per site: 2 volumes x 2 slices, so the jobs' patient split trains on 2 and validates on 2
    data = sites_1024(tmp_path / "data", sites, volumes=2, slices=2)
    job = tmp_path / "job"
    made = fedfms("job", "new", variant, job, "--rounds", 2, "--model", RANDOM_INIT, timeout=300)
    assert made.returncode == 0, made.stderr
    start = time.monotonic()
    run = fedfms("simulate", job, "--workspace", tmp_path / "ws", "--clients", ",".join(sites), "--data-root", data,
                 timeout=3600)
    wall = time.monotonic() - start
    print(run.stdout[-3000:], run.stderr[-3000:])
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "ws" / "server" / "simulate_job" / "fedfms_run.json").read_text())
    assert record["status"] == "completed"
    assert [sorted(r["accepted"]) for r in record["rounds"]] == [sites, sites]
    print(f"{variant}: {wall:.0f} s in all; rounds {[r['seconds'] for r in record['rounds']]} s; site peaks "
          f"{record['peak_rss_gb']} GB; server {record.get('server_peak_rss_gb')} GB")
    check_memory(record, "vit_b", mode, batch=min(6, train_samples(data / "site-1")))


def _poc_round(tmp_path: Path, variant: str, sites: int, threads: int) -> dict:
    """One round of ``variant`` (random init, 2 samples per site: one trains, one validates) in a fresh POC
    federation, through bench/bench_fullsize.py, which prints the processes' peak memory and the transfers."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_fullsize.py"), "--variant", variant, "--sites",
                           str(sites), "--threads", str(threads), "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=3600)
    print(proc.stdout[-4000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_vit_b_fedmsa_one_round_in_poc_with_mutual_tls(tmp_path):
    sites = ["site-1", "site-2"]
    out = _poc_round(tmp_path, "fedmsa", 2, threads=1)  # two sites share the two cores
    record = out["record"]
    assert out["status"] == "FINISHED:COMPLETED" and record["status"] == "completed"
    assert sorted(record["rounds"][0]["accepted"]) == sites
    prod = next((tmp_path / "work" / "poc").rglob("prod_00"))
    assert json.loads((prod / "server" / "startup" / "fed_server.json").read_text())["servers"][0]["connection_security"] == "mtls"
    for site in sites:
        assert json.loads((prod / site / "startup" / "fed_client.json").read_text())["client"]["connection_security"] == "mtls"
        assert f"SSL {site}]" in (prod / "server" / "log.txt").read_text(errors="replace")


def test_vit_l_fedsam_one_round_in_poc(tmp_path):
    out = _poc_round(tmp_path, "fedsam_l", 1, threads=2)  # one site: both cores
    record = out["record"]
    assert out["status"] == "FINISHED:COMPLETED" and record["status"] == "completed"
    assert list(record["rounds"][0]["accepted"]) == ["site-1"]
    transfer = record["transfers"]["0/site-1"]
    assert transfer["down_mb"] > 1000 and transfer["up_mb"] > 1000  # the whole ViT-L model both ways
    assert {"server", "server job", "site-1 client", "site-1 job"} <= set(out["sampled_peak_gb"])
    check_memory(record, "vit_l", "fedsam", batch=1)
