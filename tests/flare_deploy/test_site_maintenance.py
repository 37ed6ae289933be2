"""Server-kit settings for killed sites and a killed server (fedfms.deploy.site_setup, provisioning/site_setup.py), on a kit-shaped folder:
no FLARE process needed. The behaviour they fix was measured on real POC federations (poc/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedfms.deploy import site_setup


def _server_kit(root: Path) -> tuple[Path, Path]:
    kit, store = root / "server", root / "jobs-storage"
    (kit / "startup").mkdir(parents=True)
    (kit / "local").mkdir()
    resources = {"format_version": 2, "servers": [{"heart_beat_timeout": 600, "max_num_clients": 100}],
                 "components": [{"id": "job_manager", "path": "nvflare.apis.impl.job_def_manager.SimpleJobDefManager",
                                 "args": {"uri_root": str(store), "job_store_id": "job_store"}}]}
    (kit / "local" / "resources.json.default").write_text(json.dumps(resources))
    return kit, store


def _job(store: Path, status: str) -> str:
    job_id = str(uuid.uuid4())
    (store / job_id).mkdir(parents=True)
    (store / job_id / "meta").write_text(json.dumps({"job_id": job_id, "status": status, "name": "t"}))
    return job_id


def _status(store: Path, job_id: str) -> str:
    return json.loads((store / job_id / "meta").read_text())["status"]


def test_heart_beat_timeout_goes_to_the_servers_section(tmp_path):
    kit, _ = _server_kit(tmp_path)
    site_setup.set_server_liveness(kit, 60)
    res = json.loads((kit / "local" / "resources.json").read_text())
    assert res["servers"][0]["heart_beat_timeout"] == 60
    assert res["servers"][0]["max_num_clients"] == 100  # the rest stays as provisioned
    with pytest.raises(ValueError):
        site_setup.set_server_liveness(kit, 5)  # below two heartbeat periods


def test_stale_jobs_closes_only_jobs_no_process_runs(tmp_path):
    kit, store = _server_kit(tmp_path)
    orphan = _job(store, "RUNNING")
    done = _job(store, "FINISHED:COMPLETED")
    live = _job(store, "RUNNING")
    # A server job process names its job id on its command line.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", live])
    try:
        deadline = time.time() + 10
        while live.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():  # until it has exec'd
            assert time.time() < deadline
            time.sleep(0.05)
        assert site_setup.stale_jobs(kit) == [(orphan, "RUNNING")]
        assert _status(store, orphan) == "RUNNING"  # listing changes nothing
        assert site_setup.stale_jobs(kit, finish=True) == [(orphan, "RUNNING")]
        assert _status(store, orphan) == site_setup.ABANDONED
        assert _status(store, done) == "FINISHED:COMPLETED"
        assert _status(store, live) == "RUNNING"
        assert site_setup.stale_jobs(kit) == []
    finally:
        proc.kill()
        proc.wait()
    assert site_setup.main(["stale-jobs", str(kit), "--finish"]) == 0
    assert _status(store, live) == site_setup.ABANDONED


def test_fork_jobs_swaps_flares_process_launcher_for_the_forking_one_and_keeps_the_rest(tmp_path):
    kit, _ = _server_kit(tmp_path)
    default = kit / "local" / "resources.json.default"
    res = json.loads(default.read_text())
    flare_launcher = "nvflare.app_common.job_launcher.server_process_launcher.ServerProcessJobLauncher"
    res["components"].append({"id": "process_launcher", "path": flare_launcher, "args": {}})
    default.write_text(json.dumps(res))
    (kit / "local" / "authorization.json.default").write_text(json.dumps({"format_version": "1.0", "permissions": {}}))

    assert site_setup.main(["server", str(kit), "--no-allow-list", "--fork-jobs"]) == 0
    written = json.loads((kit / "local" / "resources.json").read_text())
    launcher = next(c for c in written["components"] if c["id"] == "process_launcher")
    assert launcher["path"] == site_setup.FORKED_LAUNCHERS[flare_launcher]
    assert [c["id"] for c in written["components"]] == ["job_manager", "process_launcher"]
    site_setup.use_forked_job_launcher(kit)  # twice: the same
    assert json.loads((kit / "local" / "resources.json").read_text()) == written

    # every class it names is importable, and is FLARE's launcher with the fork in front
    import importlib

    for flare_path, ours in site_setup.FORKED_LAUNCHERS.items():
        module, _, name = ours.rpartition(".")
        flare_module, _, flare_name = flare_path.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), name),
                          getattr(importlib.import_module(flare_module), flare_name))

    launcher["path"] = "my.own.Launcher"  # a site's own launcher (docker, k8s) is not replaced silently
    (kit / "local" / "resources.json").write_text(json.dumps(written))
    with pytest.raises(ValueError, match="process_launcher is 'my.own.Launcher'"):
        site_setup.use_forked_job_launcher(kit)
