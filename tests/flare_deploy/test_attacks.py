"""Issue 28: attacks by a consortium insider on kits provisioned from provisioning/project.yml and set up exactly as
the README says (``site_setup.py site|server``), on loopback with mutual TLS.

A hospital researcher (role ``lead``) submits, through the FLARE API, jobs that try to make the hospitals and the
server do something they did not install:

1. the attack that worked before: no custom code, the *function* ``fedfms.deploy.site_setup.add_class_allow_list``
   (admitted by the old ``"fedfms."`` prefix) with ``{WORKSPACE}`` to allow ``subprocess.``, then ``subprocess.run``
   with a shell command -- once in the sites' config and once in the server's;
2. a class outside the allow-list (FLARE's own job process launcher, which starts processes);
3. the shipped executor with its ``data_dir`` pointed at the kit's ``startup/`` (certificates and keys);
4. a code-carrying (BYOC) copy of a production job: refused at the server (nobody holds the BYOC right there) even
   though hospital-b grants it to leads.

Each must be refused before anything it names runs: no marker file written, every kit's ``local/resources.json``
byte for byte as set up, and the job's final status what docs/admin.md says."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from fedfms.deploy import admin_api, runtime as rt, site_setup

from .deploy_support import REPO, TINY_JOB, localize_project, logs_digest, make_site_data, provision, site_job_log

LEAD = "research@hospital-a.example.org"
SITES = ("hospital-a", "hospital-b")
# docs/admin.md: how FLARE 2.9 ends a job refused at start-up by the sites, and by the server
REFUSED_AT_SITES, REFUSED_AT_SERVER = "FINISHED:ABNORMAL", "FINISHED:EXECUTION_EXCEPTION"


def _job(tmp_path: Path, name: str, client=None, server=None, executor_args=None) -> Path:
    """A copy of the production tiny job, with extra components in the sites' and/or the server's config, or the
    executor's arguments changed."""
    out = tmp_path / "jobs" / name
    shutil.copytree(TINY_JOB, out)
    meta = json.loads((out / "meta.json").read_text())
    meta["name"] = name
    meta.pop("fedfms_recipe", None)
    (out / "meta.json").write_text(json.dumps(meta))
    for side, extra in (("client", client), ("server", server)):
        path = out / "app" / "config" / f"config_fed_{side}.json"
        config = json.loads(path.read_text())
        if extra:
            config["components"] = copy.deepcopy(extra) + config.get("components", [])
        if side == "client" and executor_args:
            config["executors"][0]["executor"]["args"].update(executor_args)
        path.write_text(json.dumps(config, indent=1))
    return out


def _shell_attack(marker: Path) -> list[dict]:
    return [
        {"id": "widen", "path": "fedfms.deploy.site_setup.add_class_allow_list",
         "args": {"kit": "{WORKSPACE}", "prefixes": ["subprocess."]}},
        {"id": "run", "path": "subprocess.run", "args": {"args": ["sh", "-c", f"id > {marker}"]}},
    ]


@pytest.mark.integration
def test_insider_jobs_are_refused_before_anything_runs(tmp_path):
    t0 = time.time()
    home = tmp_path / "home"
    fed_port, admin_port = rt.free_port(), rt.free_port()
    while admin_port == fed_port:
        admin_port = rt.free_port()
    project = yaml.safe_load((REPO / "provisioning" / "project.yml").read_text())
    prod = provision(localize_project(project, fed_port, admin_port), tmp_path / "provision", home)
    server_kit = prod / "localhost"
    data = {s: make_site_data(tmp_path / "data" / s, s, seed=i) for i, s in enumerate(SITES)}
    # set up as the README says: hospital-a lets nobody send code, hospital-b lets leads; the server nobody
    # and every kit forks its job processes (--fork-jobs): a forked job process refuses what a plain one does
    assert site_setup.main(["server", str(server_kit), "--storage", str(tmp_path / "server_storage"), "--fork-jobs"]) == 0
    assert site_setup.main(["site", str(prod / "hospital-a"), "--data-dir", str(data["hospital-a"]), "--threads", "1",
                            "--fork-jobs"]) == 0
    assert site_setup.main(["site", str(prod / "hospital-b"), "--data-dir", str(data["hospital-b"]), "--threads", "1",
                            "--byoc-roles", "lead", "--fork-jobs"]) == 0
    kits = {"server": server_kit, **{s: prod / s for s in SITES}}
    before = {name: (kit / "local" / "resources.json").read_bytes() for name, kit in kits.items()}
    for resources in before.values():
        assert not [e for e in json.loads(resources)["class_allow_list"] if e.endswith(".")], "no prefix entries"

    markers = {k: tmp_path / f"pwned_{k}" for k in ("sites", "server")}
    jobs = {
        "function_at_sites": _job(tmp_path, "function_at_sites", client=_shell_attack(markers["sites"])),
        "function_at_server": _job(tmp_path, "function_at_server", server=_shell_attack(markers["server"])),
        "unlisted_class": _job(tmp_path, "unlisted_class", client=[
            {"id": "launcher", "path": "nvflare.app_common.job_launcher.client_process_launcher.ClientProcessJobLauncher",
             "args": {}}]),
        "data_dir_in_kit": _job(tmp_path, "data_dir_in_kit", executor_args={"data_dir": "{WORKSPACE}/startup"}),
    }
    jobs["byoc_at_server"] = rt.export_byoc_copy(TINY_JOB, tmp_path / "jobs" / "byoc_at_server")

    env = rt.site_env(home)
    env.pop("FEDFMS_DATA_ROOT", None)
    logs = {n: tmp_path / "logs" / f"{n}.log" for n in kits}
    procs, sess = {}, None
    try:
        procs["server"] = rt.start_kit(server_kit, logs["server"], env)
        deadline = time.time() + 120
        while not (rt.port_is_open(admin_port) and rt.port_is_open(fed_port)):
            assert procs["server"].poll() is None, logs_digest(logs)
            assert time.time() < deadline, "server ports did not open\n" + logs_digest(logs)
            time.sleep(0.5)
        for site in SITES:
            procs[site] = rt.start_kit(prod / site, logs[site], env)
        sess = admin_api.connect(prod / LEAD, timeout=60)
        rt.wait_for_clients(sess, SITES, 180, procs=procs, logs=logs)

        # submitted together (the server runs up to 4 jobs at once), so their start-ups and refusals overlap
        submitted = {name: admin_api.submit(sess, job) for name, job in jobs.items()}
        outcome = {}
        for name, job_id in submitted.items():
            outcome[name] = (job_id, admin_api.monitor(sess, job_id, timeout=300, interval=2)["status"])
            print(f"{name}: {outcome[name]}")
        site_logs = {name: {s: site_job_log(prod / s, job_id) for s in SITES}
                     for name, (job_id, _) in outcome.items()}
        server_log = Path(logs["server"]).read_text(errors="replace")

        assert not any(m.exists() for m in markers.values()), "a refused job ran a command"
        for name, kit in kits.items():
            assert (kit / "local" / "resources.json").read_bytes() == before[name], f"{name}'s resources.json changed"

        for name in ("function_at_sites", "unlisted_class", "data_dir_in_kit"):
            assert outcome[name][1] == REFUSED_AT_SITES, (name, outcome[name], logs_digest(logs))
        for site in SITES:
            assert "not in allow_list" in site_logs["function_at_sites"][site], site
            assert "not in allow_list" in site_logs["unlisted_class"][site], site
            refusal = site_logs["data_dir_in_kit"][site]
            assert "job refused" in refusal and "'data_dir'" in refusal and "outside this site's" in refusal, site
            assert f"data {data[site]}" not in site_logs["data_dir_in_kit"][site], "the executor must not have started"
        assert outcome["function_at_server"][1] == REFUSED_AT_SERVER, (outcome["function_at_server"], logs_digest(logs))
        assert "add_class_allow_list" in server_log and "not in allow_list" in server_log
        assert outcome["byoc_at_server"][1] == "FINISHED:FAILED_TO_RUN", outcome["byoc_at_server"]
        assert "BYOC not permitted" in server_log

        # the federation still works for a genuine job, from the same lead (a copy: FLARE signs a submitted folder in
        # place, and the checked-in job must stay `make jobs`' output)
        genuine = tmp_path / "genuine" / TINY_JOB.name
        shutil.copytree(TINY_JOB, genuine)
        job_id = admin_api.submit(sess, genuine)
        assert admin_api.monitor(sess, job_id, timeout=600, interval=2)["status"] == admin_api.COMPLETED, logs_digest(logs)
        for name in kits:  # the refused jobs' processes and the genuine one's were all forks
            launched = logs[name].read_text(errors="replace")
            assert "(forked from fork server" in launched and "started plainly" not in launched, name
    finally:
        if sess is not None:
            rt.call_with_timeout(sess.close, 10)
        rt.kill_all([p.pid for p in procs.values()], paths=[tmp_path / "provision"])
        for p in procs.values():
            p.poll()
        print(f"attack federation wall time: {time.time() - t0:.1f} s")
