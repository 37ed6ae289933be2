"""A provisioned (mutual-TLS) federation on loopback, built from provisioning/project.yml: server and two of
the three hospitals start from their startup kits, the project admin submits the production flavour of
jobs/fedmsa_tiny (no custom code: the package is pre-installed and the sites' class_allow_list names it).
The sites grant nobody the BYOC right, so the code-carrying copy of the same job is turned away, and an
admin kit from a different provisioning is refused."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import time
from pathlib import Path

import psutil
import pytest
import yaml

from fedfms.deploy import admin_api, runtime as rt, site_setup
from fedfms.flare import site_forkserver

from .deploy_support import REPO, TINY_JOB, localize_project, logs_digest, make_site_data, provision, site_job_log

ADMIN = "admin@fedfms.example.org"
SITES = ("hospital-a", "hospital-b")  # hospital-c stays offline: the job needs only min_clients=2


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _rogue_project(fed_port: int, admin_port: int) -> dict:
    """A different project that claims the same server address and even the same admin name; only its
    root CA differs."""
    return {
        "api_version": 3, "name": "rogue", "description": "separate provisioning, separate root CA",
        "participants": [
            {"name": "localhost", "type": "server", "org": "rogue", "fed_learn_port": fed_port,
             "admin_port": admin_port},
            {"name": "hospital-x", "type": "client", "org": "rogue"},
            {"name": ADMIN, "type": "admin", "org": "rogue", "role": "project_admin"},
        ],
        "builders": yaml.safe_load((REPO / "provisioning" / "project.yml").read_text())["builders"],
    }


def _tls_talk(port: int, cert_kit: Path, ca_kit: Path) -> str:
    """TLS handshake plus one round trip with ``cert_kit``'s client certificate, trusting ``ca_kit``'s root
    CA. Returns "ok" or the error; a refused client certificate surfaces on the first read in TLS 1.3."""
    ctx = ssl.create_default_context(cafile=str(ca_kit / "startup" / "rootCA.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(cert_kit / "startup" / "client.crt"), str(cert_kit / "startup" / "client.key"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                return "ok" if tls.recv(1) else "closed without answer"
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.integration
def test_provisioned_federation_runs_production_job_and_refuses_foreign_admin(tmp_path):
    if not (TINY_JOB / "meta.json").is_file():
        pytest.fail(f"{TINY_JOB} missing: regenerate the jobs folder")
    assert not (TINY_JOB / "app" / "custom").exists(), "the production flavour carries no code"
    t0 = time.time()
    home = tmp_path / "home"
    fed_port = rt.free_port()
    admin_port = rt.free_port()
    while admin_port == fed_port:
        admin_port = rt.free_port()
    project = yaml.safe_load((REPO / "provisioning" / "project.yml").read_text())
    prod = provision(localize_project(project, fed_port, admin_port), tmp_path / "provision", home)
    server_kit, admin_kit = prod / "localhost", prod / ADMIN
    for kit in (server_kit, admin_kit, *(prod / s for s in SITES)):
        assert (kit / "startup" / "rootCA.pem").is_file(), kit
    assert json.loads((prod / SITES[0] / "startup" / "fed_client.json").read_text())["client"][
        "connection_security"] == "mtls"

    # What each party does after receiving its kit (provisioning/README.md).
    site_setup.add_class_allow_list(server_kit)
    site_setup.set_server_storage(server_kit, tmp_path / "server_storage")
    data = {
        "hospital-a": make_site_data(tmp_path / "pacs_export" / "fedfms" / "prepared", "hospital-a", seed=0),
        "hospital-b": make_site_data(tmp_path / "mnt" / "research" / "seg", "hospital-b", seed=1),
    }
    for site in SITES:
        site_setup.add_class_allow_list(prod / site)
        site_setup.write_site_config(prod / site, data_dir=data[site], threads=1)
        site_setup.set_byoc(prod / site, [])  # production jobs only: nobody may send code here

    # hospital-a starts each job's process as a fork of its own fork server (`site_setup.py site --fork-jobs`),
    # hospital-b and the server as FLARE does
    site_setup.use_forked_job_launcher(prod / "hospital-a")

    env = rt.site_env(home)
    env.pop("FEDFMS_DATA_ROOT", None)  # the data location must come from the site's own file
    env.pop(site_forkserver.ADDRESS_ENV, None)  # as on a hospital's machine: hospital-a's kit starts its own
    logs = {n: tmp_path / "logs" / f"{n}.log" for n in ("server", *SITES)}
    procs = {}
    sess = None
    try:
        procs["server"] = rt.start_kit(server_kit, logs["server"], env)
        deadline = time.time() + 120
        while not (rt.port_is_open(admin_port) and rt.port_is_open(fed_port)):
            assert procs["server"].poll() is None, logs_digest(logs)
            assert time.time() < deadline, "server ports did not open\n" + logs_digest(logs)
            time.sleep(0.5)
        for site in SITES:
            procs[site] = rt.start_kit(prod / site, logs[site], env)

        sess = admin_api.connect(admin_kit, timeout=60)
        rt.wait_for_clients(sess, SITES, 180, procs=procs, logs=logs)
        assert set(admin_api.status(sess)["sites"]) == set(SITES)

        # a copy: FLARE signs a submitted folder in place, and the checked-in job must stay as `make jobs` wrote it
        # (other tests, running at the same time under xdist, read it)
        job_id = admin_api.submit(sess, shutil.copytree(TINY_JOB, tmp_path / "submitted" / TINY_JOB.name))
        meta = admin_api.monitor(sess, job_id, timeout=900, interval=2)
        assert meta["status"] == admin_api.COMPLETED, logs_digest(logs)
        assert any(j["job_id"] == job_id for j in admin_api.list_jobs(sess))

        result = admin_api.download(sess, job_id, tmp_path / "results")
        assert (result / "workspace" / "app_server" / "FL_global_model.pt").stat().st_size > 0
        scores = json.loads(next((result / "workspace").rglob("cross_val_results.json")).read_text())
        assert set(scores) == set(SITES)
        for site in SITES:
            assert f"data {data[site]}" in site_job_log(prod / site, job_id), site
            assert not (prod / site / job_id / f"app_{site}" / "custom").exists()
        assert any((tmp_path / "server_storage" / "jobs-storage").rglob(job_id))
        forked = "(forked from fork server"
        assert forked in logs["hospital-a"].read_text(errors="replace"), logs_digest(logs)
        assert forked not in logs["hospital-b"].read_text(errors="replace")
        fork_servers = [p for p in psutil.Process(procs["hospital-a"].pid).children()
                        if "fedfms.flare.site_forkserver" in " ".join(p.cmdline())]
        assert len(fork_servers) == 1, "hospital-a's kit runs one fork server of its own"

        # These sites granted nobody the BYOC right, so the same job carrying its code is turned away.
        byoc_job = rt.export_byoc_copy(TINY_JOB, tmp_path / "byoc" / TINY_JOB.name)
        byoc_id = admin_api.submit(sess, byoc_job)
        byoc_meta = admin_api.monitor(sess, byoc_id, timeout=300, interval=2)
        assert byoc_meta["status"] == "FINISHED:FAILED_TO_RUN", byoc_meta["status"]
        assert "BYOC not permitted" in Path(logs["server"]).read_text(errors="replace")

        # An admin whose certificate comes from another provisioning must not get in.
        rogue = provision(_rogue_project(fed_port, admin_port), tmp_path / "rogue", home) / ADMIN
        t_try = time.time()
        ok, outcome = rt.call_with_timeout(lambda: admin_api.connect(rogue, timeout=8), 60)
        if ok:
            outcome.close()
        assert ok is not True, "the server accepted an admin kit from a different provisioning"
        assert ok is None or not isinstance(outcome, (FileNotFoundError, ValueError)), outcome
        print(f"foreign admin kit refused after {time.time() - t_try:.1f} s ({type(outcome).__name__}: {outcome})")
        # Why, at the TLS level: the genuine admin certificate passes; the foreign one fails both ways, its
        # CA does not vouch for our server, and our server does not accept its certificate even from a
        # client that trusts our (public) root CA.
        assert _tls_talk(admin_port, admin_kit, admin_kit) == "ok"
        assert "CERTIFICATE_VERIFY_FAILED" in _tls_talk(admin_port, rogue, rogue)
        refused = _tls_talk(admin_port, rogue, admin_kit)
        print(f"server's answer to the foreign client certificate: {refused}")
        assert refused != "ok"

        t_stop = time.time()
        done, _ = rt.call_with_timeout(lambda: admin_api.shutdown(sess, "all", timeout=90), 120)
        sess = None
        assert done, "shutdown through the admin API failed\n" + logs_digest(logs)
        assert rt.wait_pids_gone([p.pid for p in procs.values()], 60) == [], logs_digest(logs)
        deadline = time.time() + 30
        while any(_running(p) for p in fork_servers):  # its parent gone, it ends (and init reaps it)
            assert time.time() < deadline, "hospital-a's fork server outlived its kit"
            time.sleep(0.2)
        print(f"shutdown took {time.time() - t_stop:.1f} s")
    finally:
        if sess is not None:
            rt.call_with_timeout(sess.close, 10)
        rt.kill_all([p.pid for p in procs.values()], paths=[tmp_path / "provision"])
        for p in procs.values():
            p.poll()
        print(f"provisioned federation wall time: {time.time() - t0:.1f} s")
