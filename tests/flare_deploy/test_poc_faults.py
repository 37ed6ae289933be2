"""Faults as they happen in a POC federation (real server and site processes on loopback, mutual TLS):
the server killed and restarted, and a site killed with SIGKILL in the middle of a job, in one federation (in
that order: the server test needs every site back). Both bounded in time; every process started here is killed by
PID at the end."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from fedfms.cli import main
from fedfms.deploy import poc, runtime as rt, site_setup
from fedfms.flare.liveness import DEFAULT_NO_PROGRESS_S

from .deploy_support import sigkill_tree, logs_digest, make_site_data

pytestmark = pytest.mark.integration
SHARED_FEDERATION = pytest.mark.xdist_group("poc_faults")  # one worker: the module's federation starts once
SITES = ["site-1", "site-2", "site-3"]
ROUNDS = 8


def _server_job_dir(state: dict, job_id: str) -> Path:
    return Path(state["prod_dir"]) / state["server"] / job_id


def _wait_for_round(state: dict, job_id: str, round_: int, timeout: float) -> None:
    log = _server_job_dir(state, job_id) / "log.txt"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and f"Round {round_} started." in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"round {round_} of {job_id} not reached in {timeout:.0f} s:\n{logs_digest(state['logs'])}")


def _wait_for_log(state: dict, job_id: str, text: str, timeout: float) -> None:
    log = _server_job_dir(state, job_id) / "log.txt"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in the server log of {job_id} after {timeout:.0f} s:\n{logs_digest(state['logs'])}")


def _finished_result(state: dict, job_id: str, out: Path) -> Path:
    """A finished job's server workspace (FLARE moves it from the kit into its job store; download it)."""
    return poc.download(state["workspace"], job_id, str(out))


def _job_log(state: dict, job_id: str, result: Path) -> str:
    """The server's log of a finished job (its kit folder while it ran, or the downloaded result)."""
    for log in [_server_job_dir(state, job_id) / "log.txt", *result.rglob("log.txt")]:
        text = log.read_text(errors="replace") if log.is_file() else ""
        if "FederationMonitor" in text:
            return text
    raise AssertionError(f"no server log of {job_id} with the federation monitor's lines")


def _log_time(log: str, text: str) -> float:
    """Epoch seconds of the first log line containing ``text`` (FLARE's "2026-12-04 16:45:39,232 - ..." lines)."""
    line = next((line for line in log.splitlines() if text in line), None)
    assert line is not None, f"{text!r} not in the server's log"
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _record(folder: Path) -> dict:
    return json.loads(next(folder.rglob("fedfms_run.json")).read_text())


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """One POC federation for both tests: the server test first (it restarts the server and waits for every
    site to come back), then the site test (site-3 stays dead after it)."""
    tmp_path = tmp_path_factory.mktemp("poc_faults")
    ws = tmp_path / "poc"
    data = {s: make_site_data(tmp_path / "data" / s, s, seed=i) for i, s in enumerate(SITES)}
    poc.prepare(str(ws), SITES, site_data=data, threads=1, fork_jobs=True)
    try:
        yield poc.start(str(ws), timeout=300)
    finally:
        state = poc.load_state(str(ws))
        rt.kill_all(state.get("pids", {}).values(), paths=[state["poc_workspace"]])
        assert rt.processes_under([state["poc_workspace"]]) == []


@SHARED_FEDERATION
def test_a_server_killed_and_restarted_continues_the_job_with_fedfms_job_resume(federation, tmp_path, capsys):
    state = federation
    from fedfms.flare.fed_job import write_job

    # 2 local epochs a round (the variant's 20 cost ~3 CPU-s per site-round; nothing here depends on them), and still
    # 8 rounds: the server is killed in round 3 with rounds to go
    job = write_job("fedmsa_tiny", tmp_path / "job", num_rounds=ROUNDS, train={"epochs": 2})
    job_id = poc.submit(state["workspace"], str(job))
    _wait_for_round(state, job_id, 3, timeout=300)
    server_kit = Path(state["prod_dir"]) / state["server"]
    sigkill_tree(state["pids"][state["server"]])

    proc = rt.start_kit(server_kit, state["logs"][state["server"]], poc._env(state))
    state["pids"][state["server"]] = proc.pid
    poc.save_state(state)
    sess = rt.admin_session(state["admin"], state["admin_kit"], timeout=120)
    try:
        rt.wait_for_clients(sess, SITES, 180)
        # FLARE 2.9 cannot restore a running job: the restarted server tells the sites to drop theirs, and the
        # job stays RUNNING in its store with nothing running it until the guide's clean-up marks it
        deadline = time.time() + 120
        while time.time() < deadline and not site_setup.stale_jobs(server_kit):
            time.sleep(2)
        assert site_setup.stale_jobs(server_kit, finish=True) == [(job_id, "RUNNING")]
        assert sess.get_job_meta(job_id)["status"] == "FINISHED:ABANDONED"
    finally:
        sess.close()

    run = _server_job_dir(state, job_id)
    before = json.loads((run / "fedfms_run.json").read_text())
    saved = before["persisted_round"]
    assert saved is not None and saved >= 2
    resumed = tmp_path / "job_resumed"
    capsys.readouterr()
    code = main(["job", "resume", str(job), str(run), str(resumed)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"continues from round {saved + 1}" in out.out

    job_id2 = poc.submit(state["workspace"], str(resumed))
    meta = poc.wait(state["workspace"], job_id2, timeout=600)
    assert meta["status"] == "FINISHED:COMPLETED", logs_digest(state["logs"])
    result = _finished_result(state, job_id2, tmp_path / "results")
    record = _record(result)
    assert record["status"] == "completed" and record["start_round"] == saved + 1
    assert [r["round"] for r in record["rounds"]] == list(range(ROUNDS))  # continuous round numbers, none repeated
    assert record["resumed_from"] == str((run / "fedfms_run.json").resolve())
    assert next(result.rglob("FL_global_model.pt")).is_file()


@SHARED_FEDERATION
def test_a_killed_site_costs_about_a_minute_and_the_job_goes_on(federation, tmp_path):
    state = federation
    from fedfms.flare.fed_job import write_job

    # the variant's 20 local epochs: the kill must land while site-3 trains, between two of its uploads
    job = write_job("fedmsa_tiny", tmp_path / "job", num_rounds=ROUNDS)
    job_id = poc.submit(state["workspace"], str(job))
    # killed between two of its uploads: FLARE 2.9 fails the whole job when a site dies while the server is still
    # pulling its update (cell.py exits the job process; docs/federation.md), which fedfms job resume recovers
    _wait_for_log(state, job_id, "Contribution from site-3 ACCEPTED by the aggregator at round 2", timeout=300)
    killed_at = time.time()
    sigkill_tree(state["pids"]["site-3"], Path(state["prod_dir"]) / "site-3")

    meta = poc.wait(state["workspace"], job_id, timeout=600)
    after_kill = time.time() - killed_at
    print(f"site-3 killed in round 2: the job ended {after_kill:.0f} s later ({meta['status']})")
    assert meta["status"] == "FINISHED:COMPLETED", logs_digest(state["logs"])
    result = _finished_result(state, job_id, tmp_path / "results")
    record = _record(result)
    assert record["status"] == "completed_with_gaps" and record["disconnected"].keys() == {"site-3"}
    assert [r["round"] for r in record["rounds"]] == list(range(ROUNDS))
    for site in ("site-1", "site-2"):
        assert record["sites"][site]["contributed"] == list(range(ROUNDS))
    missed = record["sites"]["site-3"]["missed"]
    assert set(missed) >= {str(r) for r in range(3, ROUNDS)} and all(r not in missed for r in ("0", "1"))
    # about a minute to give up on the dead site (heartbeat 45 s + FLARE's grace 15 s and check lead 10 s), not
    # FLARE's ten: when the server's monitor logged it gone, by the log's clock (the pace of the rounds, which
    # a busy machine slows, does not enter)
    log = _job_log(state, job_id, result)
    noticed = _log_time(log, "site site-3 is gone") - killed_at
    assert noticed < poc.HEART_BEAT_TIMEOUT + 15 + 10 + 60, noticed
    # then normal rounds, and a cross-site evaluation told the site is gone instead of waiting for it: what is left
    # of the job after that takes less than the liveness bound the evaluation would otherwise have sat out for the
    # dead site (rounds and evaluations have no speed-derived timeouts; fedfms.flare.liveness)
    told = _log_time(log, "that ['site-3'] are gone")
    assert killed_at + after_kill - told < DEFAULT_NO_PROGRESS_S, (after_kill, told - killed_at)
    scores = json.loads(next(result.rglob("cross_val_results.json")).read_text())
    assert {"site-1", "site-2"} <= set(scores)
