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
