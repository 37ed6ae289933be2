"""The full POC cycle through the CLI, each step in its own process: prepare, start, submit (BYOC flavour of
jobs/fedmsa_tiny), wait, download, check, stop. The production flavour is covered by test_provision.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedfms.deploy import runtime as rt

from .deploy_support import TINY_JOB, logs_digest, make_site_data, run_cli, site_job_log


@pytest.mark.integration
def test_poc_cycle_byoc(tmp_path):
    if not (TINY_JOB / "meta.json").is_file():
        pytest.fail(f"{TINY_JOB} missing: regenerate the jobs folder")
    ws = tmp_path / "poc"
    # The two sites keep their data in unrelated places and learn about it differently: site-1 from its
    # local/fedfms_site.json, site-2 from the job default $FEDFMS_DATA_ROOT/{site_name}.
    data_1 = make_site_data(tmp_path / "hospital_a" / "disk2" / "prepared", "site-1", seed=0)
    data_root = tmp_path / "shared_root"
    data_2 = make_site_data(data_root / "site-2", "site-2", seed=1)
    out = tmp_path / "results"
    state_file = ws / "fedfms_poc.json"
    # The user's HOME as the CLI sees it: FLARE config must go to the run's own HOME, never here.
    user_home = tmp_path / "user_home"
    user_home.mkdir()
    env = {"HOME": str(user_home)}
    t0 = time.time()
    try:
        run_cli("prepare", "-w", ws, "--sites", 2, "--site-data", f"site-1={data_1}", "--data-root", data_root,
                "--no-allow-list", "--fork-jobs", env=env)
        state = json.loads(state_file.read_text())
        prod = Path(state["prod_dir"])
        assert Path(state["home"]).is_relative_to(ws) and (ws / "home" / ".nvflare" / "config.conf").is_file()
        server_res = json.loads((prod / "server" / "local" / "resources.json").read_text())
        job_store = next(c for c in server_res["components"] if c["id"] == "job_manager")["args"]["uri_root"]
        assert job_store.startswith(str(ws.resolve()))
        # A killed site is dropped after 45 s without heartbeat, not FLARE's 600 s.
        assert server_res["servers"][0]["heart_beat_timeout"] == 45
        assert state["env"]["NVFLARE_DEAD_CLIENT_GRACE_PERIOD"] == "15"
        assert str(data_1) in (prod / "site-1" / "local" / "fedfms_site.json").read_text()
        assert not (prod / "site-2" / "local" / "fedfms_site.json").exists()

        run_cli("start", "-w", ws, timeout=400, env=env)
        state = json.loads(state_file.read_text())
        assert set(state["pids"]) == {"server", "site-1", "site-2"}

        job_id = run_cli("submit", "-w", ws, "--job", TINY_JOB, "--byoc", env=env).stdout.strip().splitlines()[-1]
        res = run_cli("wait", "-w", ws, job_id, "--timeout", 900, timeout=960, env=env)
        assert res.stdout.strip().splitlines()[-1] == "FINISHED:COMPLETED", logs_digest(state["logs"])

        result = Path(run_cli("download", "-w", ws, job_id, "--out", out, env=env).stdout.strip().splitlines()[-1])
        assert result == out.resolve() / job_id
        server_ws = result / "workspace"
        assert (server_ws / "app_server" / "FL_global_model.pt").stat().st_size > 0
        scores = json.loads(next(server_ws.rglob("cross_val_results.json")).read_text())
        assert set(scores) == {"site-1", "site-2"}
        assert all(0.0 <= v["dice"] <= 1.0 for site in scores.values() for v in site.values())

        # The code really came with the job, and each site trained on its own data.
        for site, data in (("site-1", data_1), ("site-2", data_2)):
            assert (prod / site / job_id / f"app_{site}" / "custom" / "fedfms" / "__init__.py").is_file()
            assert f"data {data}" in site_job_log(prod / site, job_id), site
        # --fork-jobs, but the job's own code shadows what the fork server imported: plain processes ran it
        for name in ("server", "site-1", "site-2"):
            launched = Path(state["logs"][name]).read_text(errors="replace")
            assert "job process started plainly" in launched and "already imported by the fork server" in launched, name
        # Job store of this run, inside the run's folder.
        assert any((ws / "poc" / "jobs-storage").rglob(job_id))

        run_cli("stop", "-w", ws, timeout=200, env=env)
        assert rt.wait_pids_gone(state["pids"].values(), 30) == []
        assert rt.processes_under([ws]) == []
        assert not (user_home / ".nvflare").exists()
    finally:
        pids = json.loads(state_file.read_text()).get("pids", {}).values() if state_file.is_file() else []
        rt.kill_all(pids, paths=[ws])
        print(f"POC cycle wall time: {time.time() - t0:.1f} s")


def _listen(port: int):
    import socket

    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(1)
    return s


@pytest.mark.integration
def test_a_port_taken_after_prepare_is_redrawn_written_into_every_kit_and_the_site_connects(tmp_path, monkeypatch,
                                                                                              capsys):
    """Another program binding the drawn port between prepare and start (seen once in CI: the server then
    retried its bind for good and start waited out its whole timeout). Both ways it happens: taken before
    the server starts (found by the check before start) and taken in the moment between that check and
    the server's bind (found in the server's log)."""
    from fedfms.deploy import poc

    ws = tmp_path / "poc"
    state = poc.prepare(str(ws), ["site-1"], threads=1, fork_jobs=True)
    first = state["port"]
    second = rt.free_port()
    holders = [_listen(first), _listen(second)]
    real_is_free, real_free_port = rt.port_is_free, rt.free_port
    checked, drawn = [], []
    # the first check runs before the taker binds (the race); the first redraw lands on a taken port too

    def is_free(port):
        checked.append(port)
        return len(checked) == 1 or real_is_free(port)

    def draw():
        drawn.append(1)
        return second if len(drawn) == 1 else real_free_port()

    monkeypatch.setattr(rt, "port_is_free", is_free)
    monkeypatch.setattr(rt, "free_port", draw)
    try:
        # a taken port missed in the log would leave start waiting out this timeout and failing
        started = poc.start(str(ws), timeout=120)
        port = started["port"]
        assert port not in (first, second) and poc.load_state(str(ws))["port"] == port
        out = capsys.readouterr().out
        assert f"port {first} is taken by another program" in out and "address already in use" in out
        assert f"port {second} is in use by another program" in out
        prod = Path(started["prod_dir"])
        for config in prod.glob("*/startup/*.json"):
            text = config.read_text()
            assert str(first) not in text and str(second) not in text, config
        assert str(port) in (prod / "site-1" / "startup" / "fed_client.json").read_text()
        assert str(port) in (prod / "admin@fedfms.poc" / "startup" / "fed_admin.json").read_text()
    finally:
        for h in holders:
            h.close()
        poc.stop(str(ws), graceful=False)
        assert rt.processes_under([state["poc_workspace"]]) == []


def test_drawn_config_ports_avoid_the_kernels_ephemeral_range():
    low, high = rt.ephemeral_port_range()
    ports = {rt.free_port() for _ in range(50)}
    if low - rt.FIRST_CONFIG_PORT > 1000:
        assert all(rt.FIRST_CONFIG_PORT <= p < low for p in ports), sorted(ports)
    assert len(ports) > 40  # drawn at random: two runs preparing at once do not collide
    assert all(rt.port_is_free(p) for p in ports)


def test_the_server_counts_as_listening_only_on_its_own_socket_and_by_the_port_where_sockets_are_hidden(monkeypatch):
    import os
    import socket

    import psutil

    from fedfms.deploy import poc

    with socket.socket() as mine, socket.socket() as theirs:
        mine.bind(("127.0.0.1", 0))
        mine.listen(1)
        theirs.bind(("127.0.0.1", 0))
        port, other = mine.getsockname()[1], theirs.getsockname()[1]
        assert poc._server_listens(os.getpid(), port)
        assert not poc._server_listens(os.getpid(), other)  # bound, not listening
        assert not poc._server_listens(psutil.Process().ppid(), port)  # listened on, by someone else
        # macOS shows a process's sockets to root only: then the open port is all there is to go on
        def denied(*args, **kwargs):
            raise psutil.AccessDenied(os.getpid())

        monkeypatch.setattr(psutil.Process, "net_connections", denied)
        assert poc._server_listens(os.getpid(), port) and not poc._server_listens(os.getpid(), other)


def test_an_admin_login_stops_waiting_once_the_server_process_has_exited(tmp_path):
    import subprocess
    import sys

    log = tmp_path / "server.log"
    log.write_text("2026-12-06 - root - ERROR - could not start: the last words of this server\n")
    server = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    server.wait()
    # with the process unwatched this waits out the 120 s and raises TimeoutError instead
    with pytest.raises(RuntimeError, match="exited with code 7") as failure:
        rt.admin_session("admin@fedfms.poc", tmp_path / "no_kit", timeout=120, server=server, server_log=log)
    assert "the last words of this server" in str(failure.value)
